"""Token totals shown (issue 26): `stats` and `stats --json` per key and in total (since
added, today, the last 7 days, the cache share), and list-keys' one line, read from the
saved `tokens` / `dailyTokens` as a person runs the verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rotator.cli.main as cli
from tests.support.accounts import NOW, TODAY
from tests.support.harness import run_cli
from tests.support.plugin_files import PLUGIN_KEYS, plugin_account, plugin_file

FOUR = ("input", "output", "cacheRead", "cacheWrite")


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(cli, "now_ms", lambda: NOW)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "kimi-accounts.json"
    plugin_file(path, [
        plugin_account(PLUGIN_KEYS[0], "Personal", tokens={"input": 50_000, "output": 700, "cacheRead": 40_000,
                                                    "cacheWrite": 1000},
                       dailyTokens={TODAY: {"input": 10_000, "output": 100, "cacheRead": 9000},
                                    "2027-01-12": {"input": 30_000, "output": 500, "cacheRead": 31_000 - 1000},
                                    "2026-12-01": {"input": 10_000, "output": 100, "cacheWrite": 1000}}),
        plugin_account(PLUGIN_KEYS[1], "Work"),
    ])
    return path


def test_stats_json_gives_each_account_and_the_totals_their_tokens(path):
    result = run_cli(path, "stats", "--json", in_process=True)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    personal, work = doc["accounts"]
    assert personal["tokens"] == {"input": 50_000, "output": 700, "cacheRead": 40_000, "cacheWrite": 1000}
    assert tuple(work["tokens"]) == FOUR and set(work["tokens"].values()) == {0}
    assert personal["cacheShare"] == 0.8 and work["cacheShare"] is None
    assert personal["tokensToday"] == {"input": 10_000, "output": 100, "cacheRead": 9000, "cacheWrite": 0}
    assert personal["cacheShareToday"] == 0.9
    assert personal["tokensLast7Days"] == {"input": 40_000, "output": 600, "cacheRead": 39_000, "cacheWrite": 0}
    assert doc["totals"]["tokens"] == personal["tokens"]
    assert doc["totals"]["tokensToday"] == personal["tokensToday"]


def test_stats_shows_tokens_and_the_cache_share(path):
    result = run_cli(path, "stats", in_process=True)
    assert result.returncode == 0, result.stderr
    personal, rest = result.stdout.split("[1] Work")
    assert "Tokens: in 50.0k · out 700 · cache read 40.0k (80%) · cache write 1.0k" in personal
    assert "Tokens Today: in 10.0k · out 100 · cache read 9.0k (90%) · cache write 0" in personal
    assert "Tokens Last 7 Days: in 40.0k · out 600 · cache read 39.0k (98%) · cache write 0" in personal
    work, totals = rest.split("Aggregate Statistics")
    assert "Tokens: in 0 · out 0 · cache read 0 (-) · cache write 0" in work
    assert "Tokens: in 50.0k · out 700 · cache read 40.0k (80%) · cache write 1.0k" in totals


def test_list_keys_shows_a_line_of_tokens_for_a_key_that_spent_some(path):
    result = run_cli(path, "list-keys", in_process=True)
    assert result.returncode == 0, result.stderr
    personal, work = result.stdout.split("[1] Work")
    assert "   Tokens: in 50.0k · out 700 · cache read 40.0k (80%) · cache write 1.0k\n" in personal
    assert "Tokens" not in work
    doc = json.loads(run_cli(path, "list-keys", "--json", in_process=True).stdout)
    assert doc["accounts"][0]["tokens"]["cacheRead"] == 40_000


def test_status_json_and_metrics_give_each_key_its_tokens():
    from prometheus_client.parser import text_string_to_metric_families

    from rotator.core.models import Account, AccountsFile
    from rotator.pool.key_pool import KeyPool
    from rotator.status.document import snapshot, status_document
    from rotator.status.metrics import render_snapshot
    from rotator.status.tally import Tally

    spent = {"input": 50_000, "output": 700, "cacheRead": 40_000, "cacheWrite": 1000}
    state = AccountsFile(accounts=[
        Account(key=PLUGIN_KEYS[0], name="Personal", tokens=spent,
                daily_tokens={TODAY: {"input": 10_000, "output": 100, "cacheRead": 9000}}),
        Account(key=PLUGIN_KEYS[1], name="Work"),
    ])
    shot = snapshot(KeyPool(state), Tally(), [], NOW)
    personal, work = status_document(shot)["keys"]
    assert personal["tokens"] == spent
    assert personal["tokensToday"] == {"input": 10_000, "output": 100, "cacheRead": 9000, "cacheWrite": 0}
    assert personal["cacheShareToday"] == 0.9 and work["cacheShareToday"] is None
    assert set(work["tokens"].values()) == {0}
    body, _ = render_snapshot(shot)
    samples = {(s.labels["index"], s.labels["kind"]): s.value
               for family in text_string_to_metric_families(body.decode())
               if family.name == "kimi_rotator_key_tokens" for s in family.samples}
    assert samples == {("0", "input"): 50_000, ("0", "output"): 700, ("0", "cache_read"): 40_000,
                       ("0", "cache_write"): 1000, ("1", "input"): 0, ("1", "output"): 0,
                       ("1", "cache_read"): 0, ("1", "cache_write"): 0}
    assert b"kimi_rotator_key_tokens_total{" in body


def test_stats_by_member_shows_who_spent_what_in_the_last_7_days(tmp_path):
    path = tmp_path / "kimi-accounts.json"
    week_ago = "2027-01-01"  # outside the last 7 days
    plugin_file(path, [
        plugin_account(PLUGIN_KEYS[0], "Personal", memberTokens={
            "alice@one": {TODAY: {"input": 100, "output": 5, "cacheRead": 50}, week_ago: {"input": 10_000}},
            "bob@two": {"2027-01-10": {"input": 1000, "output": 9}}}),
        plugin_account(PLUGIN_KEYS[1], "Work", memberTokens={"alice@one": {"2027-01-12": {"input": 20, "cacheWrite": 2}}}),
    ])
    doc = json.loads(run_cli(path, "stats", "--by-member", "--json", in_process=True).stdout)
    bob, alice = doc["members"]  # most input first
    assert bob["member"] == "bob@two" and bob["tokensLast7Days"] == {"input": 1000, "output": 9, "cacheRead": 0,
                                                                     "cacheWrite": 0}
    assert bob["tokensToday"]["input"] == 0
    assert alice["tokensLast7Days"] == {"input": 120, "output": 5, "cacheRead": 50, "cacheWrite": 2}
    assert alice["tokensToday"] == {"input": 100, "output": 5, "cacheRead": 50, "cacheWrite": 0}
    assert [k["index"] for k in alice["keys"]] == [0, 1]
    text = run_cli(path, "stats", "--by-member", in_process=True).stdout
    assert "alice@one\n   Last 7 Days: in 120 · out 5 · cache read 50 (42%) · cache write 2\n" in text
    assert "   [1] Work: in 20 · out 0 · cache read 0 (0%) · cache write 2" in text
