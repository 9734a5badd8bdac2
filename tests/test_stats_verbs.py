"""The plugin's verbs that read or set its fields (issue 10, item 2): stats,
refresh-health, set-auto-refresh, set-cooldown and help, run as a person runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import rotator.cli.main as cli
from tests.support.accounts import HOUR, NOW, TODAY
from tests.support.harness import run_cli
from tests.support.plugin_files import PLUGIN_KEYS, on_disk, plugin_account, plugin_file


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(cli, "now_ms", lambda: NOW)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "config" / "kimi-accounts.json"


def run(path: Path, *args: str):
    return run_cli(path, *args, in_process=True)


def two_keys(path: Path, **top: Any) -> None:
    plugin_file(path, [
        plugin_account(PLUGIN_KEYS[0], "Personal", totalRequests=10, successfulRequests=8,
                       responseTimes=[100, 200, 301],
                       dailyRequests={TODAY: 3, "2027-01-13": 4, "2027-01-09": 1, "2027-01-08": 50}),
        plugin_account(PLUGIN_KEYS[1], "Work", totalRequests=2, successfulRequests=2, responseTimes=[1000],
                       dailyRequests={"2027-01-14": 2}),
    ], **top)


# -- stats ------------------------------------------------------------------------------------


def test_stats_shows_each_key_and_the_totals(path):
    two_keys(path)
    result = run(path, "stats")
    assert result.returncode == 0, result.stderr
    personal, work = result.stdout.split("[1] Work")
    work, totals = work.split("Aggregate Statistics")
    for line in ("[0] Personal", "Total Requests: 10", "Successful: 8", "Failed: 2", "Success Rate: 80.0%",
                 "Avg Response Time: 200ms", "Response Time Range: 100ms - 301ms", "Requests Today: 3",
                 "Requests Last 7 Days: 8"):
        assert line in personal, (line, personal)
    # oldest first: 01-09 (1), 01-13 (4), 01-15 (3); the busiest day is the full bar
    assert "Last 7 Days: ▂···█·▆  (01-09 … 01-15)" in personal
    for line in ("Total Requests: 2", "Failed: 0", "Success Rate: 100.0%", "Avg Response Time: 1000ms",
                 "Requests Today: 0", "Requests Last 7 Days: 2", "Last 7 Days: ·····█·"):
        assert line in work, (line, work)
    for line in ("Total Requests (All Keys): 12", "Total Successful: 10", "Overall Success Rate: 83.3%",
                 "Overall Avg Response Time: 400ms", "Requests Today: 3", "Requests Last 7 Days: 10"):
        assert line in totals, (line, totals)
    assert PLUGIN_KEYS[0] not in result.stdout and "sk-kim…abcd" in result.stdout


def test_stats_json_is_data(path):
    two_keys(path)
    result = run(path, "stats", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    first = doc["accounts"][0]
    assert (first["index"], first["name"], first["maskedKey"]) == (0, "Personal", "sk-kim…abcd")
    assert (first["totalRequests"], first["successfulRequests"], first["failedRequests"]) == (10, 8, 2)
    assert (first["successRate"], first["avgResponseTimeMs"]) == (80.0, 200)
    assert (first["minResponseTimeMs"], first["maxResponseTimeMs"]) == (100, 301)
    assert (first["requestsToday"], first["requestsLast7Days"]) == (3, 8)
    assert list(first["last7Days"]) == [f"2027-01-{d:02d}" for d in range(9, 16)]
    assert doc["totals"]["requestsLast7Days"] == 10 and doc["totals"]["totalRequests"] == 12
    assert PLUGIN_KEYS[0] not in result.stdout


def test_stats_of_a_key_never_used_says_na(path):
    plugin_file(path, [plugin_account(PLUGIN_KEYS[0], "New")])
    result = run(path, "stats")
    assert "Avg Response Time: N/A" in result.stdout
    assert "Success Rate" not in result.stdout.split("Aggregate")[0]
    assert "Last 7 Days: ·······" in result.stdout


def test_stats_never_shows_more_successes_than_requests_as_over_100_percent(path):
    # A file counted wrongly (issue 23, item 6: 3 successes on a re-added key's 0 requests)
    # or edited by hand: the rate is at most 100 %, and no key is "failed" below zero.
    plugin_file(path, [
        plugin_account(PLUGIN_KEYS[0], "Personal", totalRequests=1, successfulRequests=2),
        plugin_account(PLUGIN_KEYS[1], "Work", totalRequests=0, successfulRequests=3),
    ])
    result = run(path, "stats")
    assert result.returncode == 0, result.stderr
    assert "Success Rate: 100.0%" in result.stdout and "200" not in result.stdout, result.stdout
    assert "Overall Success Rate: 100.0%" in result.stdout, result.stdout
    doc = json.loads(run(path, "stats", "--json").stdout)
    assert [a["successRate"] for a in doc["accounts"]] == [100.0, None]
    assert doc["totals"]["successRate"] == 100.0


def test_stats_with_no_keys_says_how_to_add_one(path):
    result = run(path, "stats")
    assert result.returncode == 0
    assert "No Kimi API keys configured." in result.stdout
    assert not path.exists()


# -- refresh-health ---------------------------------------------------------------------------


def refresh_file(path: Path, **top: Any) -> None:
    plugin_file(path, [
        plugin_account(PLUGIN_KEYS[0], "Rested", healthScore=50, consecutiveFailures=3, lastUsed=NOW,
                       rateLimitResetTime=NOW - 2 * HOUR),
        plugin_account(PLUGIN_KEYS[1], "JustFreed", healthScore=50, lastUsed=NOW, rateLimitResetTime=NOW - 60_000),
        plugin_account(PLUGIN_KEYS[2], "Full", healthScore=100),
    ], **top)


def test_refresh_health_lifts_keys_rested_past_the_cooldown(path):
    refresh_file(path)
    result = run(path, "refresh-health")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Refreshed health for 1 key:",
        "  [0] Rested (sk-kim…abcd): 50% → 60%",
        f"Saved in {path}.",
    ]
    accounts = on_disk(path)["accounts"]
    assert [a["healthScore"] for a in accounts] == [60, 50, 100]
    assert accounts[0]["consecutiveFailures"] == 0


def test_refresh_health_follows_the_cooldown_minutes(path):
    refresh_file(path, healthRefreshCooldownMinutes=1)
    result = run(path, "refresh-health")
    assert "Refreshed health for 2 keys:" in result.stdout
    assert [a["healthScore"] for a in on_disk(path)["accounts"]] == [60, 60, 100]


def test_refresh_health_with_nothing_to_do_says_why(path):
    plugin_file(path, [plugin_account(PLUGIN_KEYS[0], "Full")])
    before = path.read_bytes()
    result = run(path, "refresh-health")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "No keys needed health refresh.",
        "Keys must be below 100% health and past the cooldown period (30 minutes).",
    ]
    assert path.read_bytes() == before


def test_refresh_health_with_auto_refresh_off_changes_nothing_and_says_why(path):
    refresh_file(path, autoRefreshHealth=False)
    before = path.read_bytes()
    result = run(path, "refresh-health")
    assert result.returncode == 0
    assert "Auto-refresh is off" in result.stdout and "set-auto-refresh true" in result.stdout
    assert path.read_bytes() == before


# -- set-auto-refresh, set-cooldown -----------------------------------------------------------


def test_set_auto_refresh_writes_the_plugins_field(path):
    two_keys(path)
    assert run(path, "set-auto-refresh", "false").stdout == f"Auto-refresh health: false\nSaved in {path}.\n"
    assert on_disk(path)["autoRefreshHealth"] is False
    assert run(path, "set-auto-refresh", "true").stdout == f"Auto-refresh health: true\nSaved in {path}.\n"
    assert on_disk(path)["autoRefreshHealth"] is True


@pytest.mark.parametrize("value", ["yes", "True", "1", ""])
def test_set_auto_refresh_refuses_anything_but_true_or_false(path, value):
    two_keys(path)
    before = path.read_bytes()
    result = run(path, "set-auto-refresh", value)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "expected true or false" in result.stderr
    assert path.read_bytes() == before


def test_set_cooldown_writes_the_plugins_field(path):
    two_keys(path)
    assert run(path, "set-cooldown", "60").stdout == f"Health refresh cooldown: 60 minutes\nSaved in {path}.\n"
    assert on_disk(path)["healthRefreshCooldownMinutes"] == 60
    assert run(path, "set-cooldown", "1440").returncode == 0
    assert on_disk(path)["healthRefreshCooldownMinutes"] == 1440


@pytest.mark.parametrize("value", ["0", "1441", "-5", "30.5", "abc", "1e3"])
def test_set_cooldown_refuses_outside_1_to_1440_and_writes_nothing(path, value):
    two_keys(path)
    before = path.read_bytes()
    result = run(path, "set-cooldown", value)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "1 to 1440" in result.stderr
    assert path.read_bytes() == before


def test_settings_verbs_create_no_file_when_refused(path):
    assert run(path, "set-cooldown", "0").returncode == 2
    assert not path.exists()


def test_set_cooldown_changes_what_list_keys_shows_as_recovered(path):
    plugin_file(path, [plugin_account(PLUGIN_KEYS[0], "Low", healthScore=20, lastUsed=NOW - 2 * HOUR)])
    assert "Health: ██████░░░░ 60%" in run(path, "list-keys").stdout
    run(path, "set-cooldown", "60")
    assert "Health: ████░░░░░░ 40%" in run(path, "list-keys").stdout
    run(path, "set-auto-refresh", "false")
    assert "Health: ██░░░░░░░░ 20%" in run(path, "list-keys").stdout


# -- help -------------------------------------------------------------------------------------


def test_help_lists_every_verb_with_its_arguments(path):
    result = run(path, "help")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert "Commands:" in lines and "Strategies:" in lines and "Examples:" in lines
    commands = [line.split()[0] for line in lines[lines.index("Commands:") + 1:lines.index("Strategies:") - 1]]
    assert commands == [verb.name for verb in cli.VERBS]
    for shown in ("stats [--json]", "set-auto-refresh true|false", "set-cooldown MINUTES",
                  "clear-limits INDEX|NAME|KEY|all", "use-key INDEX|NAME|KEY", "add-key KEY [NAME]", "refresh-health"):
        assert any(line.strip().startswith(shown) for line in lines), shown
    assert not path.exists()
