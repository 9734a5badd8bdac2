"""The key-management CLI, run in-process through `main([...])` (tests.support.harness.run_cli).

Every test's captured output is scanned afterwards for full keys: no output of the
CLI may ever contain one.
"""

from __future__ import annotations

import errno
import builtins
import contextlib
import io
import json
import os
import re
import stat
import sys
from pathlib import Path

import pytest

import rotator.cli.main as cli
from rotator.core import key_view
from rotator.core.keys import mask_key
from tests.support.harness import run_cli

CLI_NOW = 1_750_000_000_000  # 2025-06-15: the CLI's clock here, before the wall clock (a stamp from the future reads as now)
MIN = 60_000

KEY1 = "sk-kimi-FAKEtestkey0000000000000001"
KEY2 = "sk-kimi-FAKEtestkey0000000000000002"
KEY3 = "sk-kimi-FAKEtestkey0000000000000003"
KEY4 = "sk-kimi-FAKEtestkey0000000000000004"
KEY5 = "sk-kimi-FAKEtestkey0000000000000005"
NOT_KIMI = "sk-ant-FAKEtestkey0000000000000009"
ALL_KEYS = (KEY1, KEY2, KEY3, KEY4, KEY5, NOT_KIMI)
_ANY_KEY = re.compile(r"sk-(kimi|ant)-[A-Za-z0-9_\-]{4,}")

# The plugin README's "Data Storage" file with realistic values, plus fields we don't
# know (one per account, one at top level) that must survive our writes.
PLUGIN_FILE = {
    "version": 1,
    "accounts": [
        {
            "key": KEY1,
            "name": "My Account 1",
            "addedAt": 1749000000000,
            "lastUsed": 1749990000000,
            "rateLimitResetTime": 0,
            "healthScore": 100,
            "consecutiveFailures": 0,
            "totalRequests": 50,
            "successfulRequests": 45,
            "dailyRequests": {"2025-06-15": 12},
        },
        {
            "key": KEY2,
            "name": "My Account 2",
            "addedAt": 1749000100000,
            "lastUsed": 1749980000000,
            "rateLimitResetTime": 1749990300000,
            "healthScore": 80,
            "consecutiveFailures": 1,
            "totalRequests": 25,
            "successfulRequests": 20,
            "responseTimes": [812, 640],
        },
    ],
    "activeIndex": 0,
    "rotationStrategy": "health-based",
    "autoRefreshHealth": True,
}


# ----------------------------------------------------------------------------- fixtures


class Runner:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[str] = []

    def __call__(self, *args: str, accounts: bool = True, stdin: str | None = None,
                 encoding: str = "utf-8") -> tuple[int, str, str]:
        done = run_cli(self.path if accounts else None, *args, stdin=stdin, in_process=True,
                       encoding=encoding)
        self.seen += [done.stdout, done.stderr]
        return done.returncode, done.stdout, done.stderr

    def ok(self, *args: str) -> str:
        code, out, err = self(*args)
        assert (code, err) == (0, ""), err
        return out

    def fails(self, *args: str, code: int = 2, stdin: str | None = None) -> str:
        """Run a command that must fail: the code, one stderr line, no stdout."""
        got, out, err = self(*args, stdin=stdin)
        assert got == code, (got, out, err)
        assert out == ""
        assert err.count("\n") == 1 and err.endswith("\n"), err
        assert err.startswith("kimi-rotator: error: "), err
        return err.rstrip("\n")

    def data(self) -> dict:
        return json.loads(self.path.read_text())


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(cli, "now_ms", lambda: CLI_NOW)
    monkeypatch.setattr(sys, "argv", ["kimi-rotator"])
    monkeypatch.delenv("KIMI_ROTATOR_ACCOUNTS", raising=False)


@pytest.fixture
def run(capsys, tmp_path):
    runner = Runner(tmp_path / "kimi-accounts.json")
    yield runner
    out, err = capsys.readouterr()
    for text in [*runner.seen, out, err]:
        for key in ALL_KEYS:
            assert key not in text, f"a full key was printed: {text!r}"
        assert not _ANY_KEY.search(text), f"something key-shaped was printed: {text!r}"


def write(path: Path, data: dict | str | bytes) -> bytes:
    raw = data if isinstance(data, bytes) else (
        data.encode() if isinstance(data, str) else json.dumps(data, indent=2).encode()
    )
    path.write_bytes(raw)
    os.chmod(path, 0o600)
    return raw


def account(key: str, name: str, **fields) -> dict:
    base = {
        "key": key,
        "name": name,
        "addedAt": CLI_NOW - 86_400_000,
        "lastUsed": CLI_NOW - MIN,
        "rateLimitResetTime": 0,
        "healthScore": 100,
        "consecutiveFailures": 0,
        "totalRequests": 0,
        "successfulRequests": 0,
    }
    base.update(fields)
    return base


def three_keys(active: int = 0, strategy: str = "health-based") -> dict:
    return {
        "version": 1,
        "accounts": [account(KEY1, "One"), account(KEY2, "Two"), account(KEY3, "Three")],
        "activeIndex": active,
        "rotationStrategy": strategy,
    }


# ------------------------------------------------------------------------------ add-key


def test_add_key_creates_the_file_and_appends(run):
    # Every change says the file (or store) it changed (issue 27): "Saved in PATH."
    assert run.ok("add-key", KEY1, "Work") == f"Added [0] Work ({mask_key(KEY1)}). 1 key.\nSaved in {run.path}.\n"
    assert run.ok("add-key", KEY2) == f"Added [1] Account 2 ({mask_key(KEY2)}). 2 keys.\nSaved in {run.path}.\n"
    data = run.data()
    assert data["version"] == 1
    assert data["activeIndex"] == 0
    assert data["rotationStrategy"] == "health-based"
    assert [(a["key"], a["name"], a["addedAt"]) for a in data["accounts"]] == [
        (KEY1, "Work", CLI_NOW),
        (KEY2, "Account 2", CLI_NOW),
    ]
    first = data["accounts"][0]
    assert first["healthScore"] == 100
    assert first["rateLimitResetTime"] == 0
    assert first["totalRequests"] == first["successfulRequests"] == 0
    assert first["disabledReason"] is None
    assert stat.S_IMODE(run.path.stat().st_mode) == 0o600


def test_add_key_reads_the_key_from_stdin(run):
    code, out, err = run("add-key", "-", "Piped", stdin=KEY3 + "\n")
    assert (code, err) == (0, ""), err
    assert out == f"Added [0] Piped ({mask_key(KEY3)}). 1 key.\nSaved in {run.path}.\n"
    assert run.data()["accounts"][0]["key"] == KEY3


@pytest.mark.parametrize(("bad", "why"), [
    (NOT_KIMI, "not a Kimi API key (they start with sk-kimi-)"),
    ("hello", "not a Kimi API key (they start with sk-kimi-)"),
    ("", "not a Kimi API key (they start with sk-kimi-)"),
    # It does start with sk-kimi-: say what is wrong instead.
    ("sk-kimi-short", "too short for a Kimi API key (sk-kimi- and at least 8 more characters; this has 5)"),
    ("sk-kimi-FAKE key0000000001", "holds characters no Kimi API key has (a space, a line break, punctuation?)"),
    ("sk-kimi-FAKE00000000\r\n00000001", "holds characters no Kimi API key has"),
])
def test_add_key_refuses_what_is_not_a_kimi_key(run, bad, why):
    raw = write(run.path, three_keys())
    err = run.fails("add-key", bad, "Name")
    assert err.startswith(f"kimi-rotator: error: {why}")
    if len(bad) > 12:
        assert bad not in err
    assert run.path.read_bytes() == raw


def test_add_key_refuses_a_bad_key_from_stdin(run):
    err = run.fails("add-key", "-", stdin=NOT_KIMI + "\n")
    assert "not a Kimi API key" in err and mask_key(NOT_KIMI) in err
    assert not run.path.exists()


def test_add_key_refuses_a_duplicate_naming_mask_and_index(run):
    raw = write(run.path, three_keys())
    err = run.fails("add-key", KEY2, "Again")
    assert err == f"kimi-rotator: error: key {mask_key(KEY2)} is already in the list at [1] Two"
    assert run.path.read_bytes() == raw


def test_add_key_refuses_a_name_that_is_a_key(run):
    err = run.fails("add-key", KEY1, KEY2)
    assert "NAME looks like an API key" in err
    assert not run.path.exists()


# ---------------------------------------------------------------------------- list-keys


def test_list_keys_layout(run):
    write(
        run.path,
        {
            "version": 1,
            "accounts": [
                account(KEY1, "My Account 1", totalRequests=50, successfulRequests=45),
                account(
                    KEY2,
                    "My Account 2",
                    healthScore=80,
                    lastUsed=CLI_NOW,
                    totalRequests=25,
                    successfulRequests=20,
                    rateLimitResetTime=CLI_NOW + 4 * MIN + 12_000,
                    cooldownReason="429 Too Many Requests",
                ),
                account(KEY3, "Worn out", healthScore=0, lastUsed=CLI_NOW, totalRequests=9),
                account(KEY4, "Revoked", healthScore=40, lastUsed=CLI_NOW, disabledReason="401 Unauthorized"),
                # 50, rested 65 minutes: two whole recovery periods, shown as 70.
                account(KEY5, "Resting", healthScore=50, lastUsed=CLI_NOW - 65 * MIN,
                        rateLimitResetTime=CLI_NOW - 1),
            ],
            "activeIndex": 1,
            "rotationStrategy": "sticky",
        },
    )
    assert run.ok("list-keys") == (
        "Kimi API Keys (5 total, strategy: sticky; ● is the key in use):\n"
        "\n"
        "○ [0] My Account 1\n"
        "   Key: sk-kim…0001\n"
        "   Health: ██████████ 100%\n"
        "   Requests: 45/50 successful\n"
        "   Status: ✓ Ready\n"
        "\n"
        "● [1] My Account 2\n"
        "   Key: sk-kim…0002\n"
        "   Health: ████████░░ 80%\n"
        "   Requests: 20/25 successful\n"
        "   Status: ⏳ Cooling down (free in 4m 12s): 429 Too Many Requests\n"
        "\n"
        "○ [2] Worn out\n"
        "   Key: sk-kim…0003\n"
        "   Health: ░░░░░░░░░░ 0%\n"
        "   Requests: 0/9 successful\n"
        "   Status: ⚠ Low health (skipped until it recovers)\n"
        "\n"
        "○ [3] Revoked\n"
        "   Key: sk-kim…0004\n"
        "   Health: ████░░░░░░ 40%\n"
        "   Requests: 0/0 successful\n"
        "   Status: ✗ Disabled: 401 Unauthorized\n"
        "\n"
        "○ [4] Resting\n"
        "   Key: sk-kim…0005\n"
        "   Health: ███████░░░ 70%\n"
        "   Requests: 0/0 successful\n"
        "   Status: ✓ Ready\n"
    )


def test_list_keys_cooling_without_a_reason(run):
    write(run.path, {"version": 1, "accounts": [account(KEY1, "A", rateLimitResetTime=CLI_NOW + 45_500)]})
    assert "   Status: ⏳ Cooling down (free in 46s)\n" in run.ok("list-keys")


def test_list_keys_with_no_keys(run):
    assert run.ok("list-keys") == (
        "No Kimi API keys configured.\nAdd one with: kimi-rotator add-key KEY [NAME]\n"
    )
    assert not run.path.exists()


def test_list_keys_json(run):
    write(
        run.path,
        {
            "version": 1,
            "accounts": [
                account(KEY1, "One", totalRequests=50, successfulRequests=45),
                account(KEY2, "Two", healthScore=20, lastUsed=CLI_NOW, rateLimitResetTime=CLI_NOW + MIN,
                        cooldownReason="429", disabledReason="banned"),
            ],
            "activeIndex": 1,
            "rotationStrategy": "round-robin",
        },
    )
    doc = json.loads(run.ok("list-keys", "--json"))
    assert doc["strategy"] == "round-robin"
    assert doc["activeIndex"] == 1
    one, two = doc["accounts"]
    assert one == {
        "index": 0,
        "active": False,
        "name": "One",
        "maskedKey": mask_key(KEY1),
        "health": 100,
        "totalRequests": 50,
        "successfulRequests": 45,
        "rateLimitResetTime": 0,
        "cooling": False,
        "disabledReason": None,
        "cooldownReason": None,
        "lastUsed": CLI_NOW - MIN,
        "status": "✓ Ready",
        "tokens": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
    }
    assert (two["active"], two["health"], two["cooling"]) == (True, 20, True)
    assert (two["disabledReason"], two["cooldownReason"]) == ("banned", "429")
    assert two["rateLimitResetTime"] == CLI_NOW + MIN
    assert "key" not in one and "key" not in two


def test_list_keys_json_with_no_keys(run):
    assert json.loads(run.ok("list-keys", "--json")) == {
        "strategy": "health-based",
        "activeIndex": 0,
        "accounts": [],
    }


def test_list_keys_warns_when_others_can_read_the_file(run):
    write(run.path, three_keys())
    os.chmod(run.path, 0o644)
    code, out, err = run("list-keys")
    assert code == 0 and out.startswith("Kimi API Keys (3 total")
    assert err.startswith("kimi-rotator: warning: ") and "chmod 600" in err
    assert err.count("\n") == 1


def test_list_keys_falls_back_to_ascii(run):
    write(run.path, {"version": 1, "accounts": [
        account(KEY1, "Café", healthScore=80, lastUsed=CLI_NOW),
        account(KEY2, "B", rateLimitResetTime=CLI_NOW + MIN)]})
    code, text, _ = run("list-keys", encoding="ascii")  # a terminal that can't show the glyphs
    assert code == 0
    assert "* [0] Caf?\n" in text
    assert "   Key: sk-kim...0001\n" in text
    assert "   Health: ########-- 80%\n" in text
    assert "o [1] B\n" in text
    assert "   Status: + Ready\n" in text
    assert "   Status: ~ Cooling down (free in 1m 0s)\n" in text


# --------------------------------------------------------------------------- remove-key


@pytest.mark.parametrize(
    ("active", "remove", "left", "new_active"),
    [
        (2, 0, ["Two", "Three"], 1),  # the active key moved down: follow it
        (0, 2, ["One", "Two"], 0),
        (1, 1, ["One", "Three"], 1),  # removed the active key: the next takes its place
        (2, 2, ["One", "Two"], 1),  # removed the active last key: clamp
    ],
)
def test_remove_key_keeps_the_active_key(run, active, remove, left, new_active):
    write(run.path, three_keys(active=active))
    out = run.ok("remove-key", str(remove))
    removed = ["One", "Two", "Three"][remove]
    removed_key = [KEY1, KEY2, KEY3][remove]
    assert out.startswith(f"Removed [{remove}] {removed} ({mask_key(removed_key)}). 2 keys left.\n")
    assert f"Active key: [{new_active}] {left[new_active]} " in out
    data = run.data()
    assert [a["name"] for a in data["accounts"]] == left
    assert data["activeIndex"] == new_active
    assert all(a["key"] != removed_key for a in data["accounts"])


def test_remove_the_only_key(run):
    write(run.path, {"version": 1, "accounts": [account(KEY1, "Solo")], "activeIndex": 0})
    assert run.ok("remove-key", "0") == f"Removed [0] Solo ({mask_key(KEY1)}). 0 keys left.\nSaved in {run.path}.\n"
    assert run.data()["accounts"] == [] and run.data()["activeIndex"] == 0


# ------------------------------------------------------------------- rotate and use-key


def test_rotate_moves_to_the_next_key_and_wraps(run):
    write(run.path, three_keys(active=1))
    assert run.ok("rotate") == f"Rotated to [2] Three ({mask_key(KEY3)}).\nSaved in {run.path}.\n"
    assert run.data()["activeIndex"] == 2
    assert run.ok("rotate") == f"Rotated to [0] One ({mask_key(KEY1)}).\nSaved in {run.path}.\n"
    assert run.data()["activeIndex"] == 0


def test_rotate_notes_a_key_that_is_cooling(run):
    data = three_keys()
    data["accounts"][1]["rateLimitResetTime"] = CLI_NOW + 90_000
    write(run.path, data)
    assert run.ok("rotate") == (
        f"Rotated to [1] Two ({mask_key(KEY2)}).\nNote: ⏳ Cooling down (free in 1m 30s)\nSaved in {run.path}.\n"
    )


def test_rotate_with_no_keys_is_an_error(run):
    err = run.fails("rotate")
    assert "no keys configured" in err
    assert not run.path.exists()


def test_use_key(run):
    write(run.path, three_keys())
    assert run.ok("use-key", "2") == f"Now using [2] Three ({mask_key(KEY3)}).\nSaved in {run.path}.\n"
    assert run.data()["activeIndex"] == 2


@pytest.mark.parametrize("ref", ["Three", mask_key(KEY3), mask_key(KEY3).replace("…", "...")])
def test_use_key_by_name_or_masked_key(run, ref):
    write(run.path, three_keys())
    assert run.ok("use-key", ref) == f"Now using [2] Three ({mask_key(KEY3)}).\nSaved in {run.path}.\n"
    assert run.data()["activeIndex"] == 2


def test_a_name_that_is_no_key_changes_nothing(run):
    raw = write(run.path, three_keys())
    assert run.fails("use-key", "Nobody") == (
        "kimi-rotator: error: 'Nobody' is neither an INDEX (a whole number 0 or more) nor the name"
        " or masked key of a key (see list-keys)"
    )
    assert run.path.read_bytes() == raw


def test_enable_key_and_clear_limits_by_name(run):
    data = three_keys()
    data["accounts"][1].update(disabledReason="401 Unauthorized", consecutiveFailures=3,
                               rateLimitResetTime=CLI_NOW + MIN, cooldownReason="429")
    write(run.path, data)
    assert run.ok("enable-key", "Two").startswith(f"Enabled [1] Two ({mask_key(KEY2)})")
    run.ok("clear-limits", "Two")
    after = run.data()["accounts"][1]
    assert after["disabledReason"] is None and after["rateLimitResetTime"] == 0


# ------------------------------------------------------------------------- set-strategy


@pytest.mark.parametrize("strategy", ["round-robin", "health-based", "sticky"])
def test_set_strategy(run, strategy):
    write(run.path, three_keys(strategy="sticky" if strategy != "sticky" else "round-robin"))
    assert run.ok("set-strategy", strategy) == f"Rotation strategy set to: {strategy}\nSaved in {run.path}.\n"
    assert run.data()["rotationStrategy"] == strategy


def test_unknown_strategy_lists_the_three(run):
    raw = write(run.path, three_keys())
    err = run.fails("set-strategy", "random")
    assert err == (
        "kimi-rotator: error: unknown strategy 'random' "
        "(choose one of: round-robin, health-based, sticky)"
    )
    assert run.path.read_bytes() == raw


# ------------------------------------------------------------- enable-key, clear-limits


def test_enable_key(run):
    data = three_keys()
    data["accounts"][1].update(disabledReason="401 Unauthorized", consecutiveFailures=3)
    write(run.path, data)
    assert run.ok("enable-key", "1") == (
        f"Enabled [1] Two ({mask_key(KEY2)}) (was disabled: 401 Unauthorized).\nSaved in {run.path}.\n"
    )
    after = run.data()["accounts"][1]
    assert after["disabledReason"] is None and after["consecutiveFailures"] == 0
    assert run.ok("enable-key", "1") == (
        f"[1] Two ({mask_key(KEY2)}) was not disabled; it stays enabled.\n"
    )


def _cooling_file(run) -> None:
    data = three_keys()
    for i, acct in enumerate(data["accounts"]):
        acct.update(rateLimitResetTime=CLI_NOW + (i + 1) * MIN, cooldownReason=f"429 #{i}", cooldownLevel=2)
    write(run.path, data)


def test_clear_limits_one(run):
    _cooling_file(run)
    assert run.ok("clear-limits", "1") == f"Cleared rate limits on [1] Two ({mask_key(KEY2)}).\nSaved in {run.path}.\n"
    accounts = run.data()["accounts"]
    assert [(a["rateLimitResetTime"], a["cooldownReason"]) for a in accounts] == [
        (CLI_NOW + MIN, "429 #0"),
        (0, None),
        (CLI_NOW + 3 * MIN, "429 #2"),
    ]


def test_clear_limits_all(run):
    _cooling_file(run)
    assert run.ok("clear-limits", "all") == f"Cleared rate limits on all 3 keys.\nSaved in {run.path}.\n"
    accounts = run.data()["accounts"]
    assert [(a["rateLimitResetTime"], a["cooldownReason"]) for a in accounts] == [(0, None)] * 3
    assert [a["cooldownLevel"] for a in accounts] == [0] * 3  # the next cooldown starts short


def test_clear_limits_all_with_no_keys_writes_nothing(run):
    assert run.ok("clear-limits", "all") == "No keys configured; nothing to clear.\n"
    assert not run.path.exists()


# ------------------------------------------------------------------------ index errors

INDEX_VERBS = ["remove-key", "use-key", "enable-key", "clear-limits"]


@pytest.mark.parametrize("verb", INDEX_VERBS)
def test_index_out_of_range(run, verb):
    raw = write(run.path, three_keys())
    assert run.fails(verb, "7") == "kimi-rotator: error: index 7 out of range (3 keys: 0-2)"
    assert run.fails(verb, "3") == "kimi-rotator: error: index 3 out of range (3 keys: 0-2)"
    assert run.path.read_bytes() == raw


@pytest.mark.parametrize("verb", INDEX_VERBS)
def test_index_with_no_keys(run, verb):
    assert run.fails(verb, "0") == "kimi-rotator: error: index 0 out of range (no keys configured)"
    assert not run.path.exists()


@pytest.mark.parametrize("verb", INDEX_VERBS)
@pytest.mark.parametrize("bad", ["-1", "1.5", "one", "", " 1", "+1", "١"])
def test_index_must_be_a_whole_number(run, verb, bad):
    raw = write(run.path, three_keys())
    err = run.fails(verb, bad)
    assert "INDEX" in err and "whole number" in err
    assert run.path.read_bytes() == raw


def test_missing_arguments_and_unknown_verb(run):
    raw = write(run.path, three_keys())
    assert run.ok().startswith("Kimi API Key Rotator")  # no verb: the help page (issue 27)
    assert "required" in run.fails("remove-key")
    assert "required" in run.fails("add-key")
    assert "invalid choice" in run.fails("frobnicate")
    assert "unrecognized arguments" in run.fails("rotate", "now")
    assert run.path.read_bytes() == raw


def test_stray_key_in_an_error_is_masked(run):
    err = run.fails("list-keys", KEY4)
    assert mask_key(KEY4) in err


# ------------------------------------------------------------------------- file errors

MUTATING = [
    ("add-key", KEY5, "New"),
    ("remove-key", "0"),
    ("rotate",),
    ("use-key", "0"),
    ("set-strategy", "sticky"),
    ("enable-key", "0"),
    ("clear-limits", "all"),
]
ALL_VERBS = [("list-keys",), ("list-keys", "--json"), *MUTATING]

BAD_FILES = {
    "corrupt JSON": (b'{"version": 1, "accounts": [', "not valid JSON"),
    "version 2": (
        json.dumps({"version": 2, "accounts": [account(KEY1, "A")]}).encode(),
        "unsupported version 2",
    ),
    "schema error": (
        json.dumps({"version": 1, "accounts": [account(KEY1, "A", healthScore="lots")]}).encode(),
        "invalid accounts file at accounts.0.healthScore",
    ),
    "accounts not a list": (
        json.dumps({"version": 1, "accounts": {"key": KEY1}}).encode(),
        "invalid accounts file at accounts",
    ),
}


@pytest.mark.parametrize("args", ALL_VERBS, ids=" ".join)
@pytest.mark.parametrize("problem", list(BAD_FILES))
def test_bad_file_is_reported_and_left_alone(run, args, problem):
    content, message = BAD_FILES[problem]
    raw = write(run.path, content)
    err = run.fails(*args, code=1)
    assert err.startswith(f"kimi-rotator: error: {run.path}: {message}"), err
    assert run.path.read_bytes() == raw
    assert [p.name for p in run.path.parent.iterdir()] == [run.path.name]


@pytest.mark.parametrize("args", ALL_VERBS, ids=" ".join)
def test_directory_in_place_of_the_file(run, args):
    run.path.mkdir()
    err = run.fails(*args, code=1)
    assert err.startswith(f"kimi-rotator: error: {run.path}: "), err
    assert run.path.is_dir() and list(run.path.iterdir()) == []


@contextlib.contextmanager
def unreadable(path: Path, monkeypatch: pytest.MonkeyPatch):
    """`path` can't be opened for reading while this lasts: chmod 000, or, for root
    (whom the mode doesn't stop), every open of that one path fails as the kernel would
    fail it for anyone else: PermissionError(EACCES)."""
    if os.geteuid() != 0:
        os.chmod(path, 0)
        try:
            yield
        finally:
            os.chmod(path, 0o600)
        return
    target = os.path.realpath(path)

    def denied(file: object) -> bool:
        return isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(file)) == target

    def refuse(file: object) -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(file))  # type: ignore[arg-type]

    real_io_open, real_os_open = io.open, os.open

    def io_open(file, *args, **kwargs):
        if denied(file):
            raise refuse(file)
        return real_io_open(file, *args, **kwargs)

    def os_open(file, *args, **kwargs):
        if denied(file):
            raise refuse(file)
        return real_os_open(file, *args, **kwargs)

    with monkeypatch.context() as patch:
        # pathlib's read_bytes opens through io.open; open() and os.open for any other way.
        patch.setattr(io, "open", io_open)
        patch.setattr(builtins, "open", io_open)
        patch.setattr(os, "open", os_open)
        with pytest.raises(PermissionError):
            path.read_bytes()  # the patch really stands in for the mode
        yield


@pytest.mark.parametrize("args", ALL_VERBS, ids=" ".join)
def test_unreadable_file(run, args, monkeypatch):
    raw = write(run.path, three_keys())
    with unreadable(run.path, monkeypatch):
        err = run.fails(*args, code=1)
    assert err.startswith(f"kimi-rotator: error: {run.path}: Permission denied"), err
    assert run.path.read_bytes() == raw


# ------------------------------------------------------------------ plugin compatibility


def test_plugin_file_survives_rotate(run):
    write(run.path, PLUGIN_FILE)
    listing = run.ok("list-keys")
    assert listing.startswith("Kimi API Keys (2 total, strategy: health-based; ● is the key in use):\n\n● [0] My Account 1\n")
    assert run.ok("rotate") == f"Rotated to [1] My Account 2 ({mask_key(KEY2)}).\nSaved in {run.path}.\n"
    after = run.data()
    assert after["activeIndex"] == 1
    for field, value in PLUGIN_FILE.items():
        if field not in ("accounts", "activeIndex"):
            assert after[field] == value, field
    for before, now in zip(PLUGIN_FILE["accounts"], after["accounts"], strict=True):
        for field, value in before.items():
            assert now[field] == value, field


# --------------------------------------------------------------------- paths and names


def test_accounts_option_after_the_verb(run):
    other = run.path.with_name("other.json")
    code, out, err = run("add-key", KEY1, "--accounts", str(other), accounts=False)
    assert (code, err) == (0, "")
    assert json.loads(other.read_text())["accounts"][0]["key"] == KEY1
    assert not run.path.exists()


def test_accounts_from_the_environment(run, monkeypatch):
    env_path = run.path.with_name("from-env.json")
    monkeypatch.setenv("KIMI_ROTATOR_ACCOUNTS", str(env_path))
    code, _, err = run("add-key", KEY1, accounts=False)
    assert (code, err) == (0, "")
    assert json.loads(env_path.read_text())["accounts"][0]["key"] == KEY1
    # --accounts wins over the environment.
    assert run.ok("add-key", KEY2).startswith("Added [0] ")
    assert run.data()["accounts"][0]["key"] == KEY2


@pytest.mark.parametrize(
    "verb", [None, "add-key", "list-keys", "remove-key", "rotate", "use-key",
             "set-strategy", "enable-key", "clear-limits"],
)
def test_help_everywhere(run, verb):
    code, out, err = run(*([verb] if verb else []), "--help")
    assert (code, err) == (0, "")
    if verb:
        assert out.startswith(f"usage: kimi-rotator {verb}")
    else:
        assert out.startswith("Kimi API Key Rotator (kimi-rotator)\n\nUsage: kimi-rotator ")
    assert not run.path.exists()


@pytest.mark.parametrize("asked", [(), ("--help",), ("-h",), ("help",)], ids=["bare", "--help", "-h", "help"])
def test_one_help_page_lists_verbs_options_and_exit_codes(run, asked):
    code, out, err = run(*asked)
    assert (code, err) == (0, "")
    assert out == run("help")[1]  # the same page, whichever way it is asked for
    for part in ("Commands:", "  use-key INDEX|NAME|KEY", "Strategies:", "Examples:",
                 "Options (before or after the command):", "  --accounts PATH", "  --store URL",
                 "  -h, --help", "Exit codes: 0 ok"):
        assert part in out, part
    assert not run.path.exists()


def test_prog_is_the_invoked_name(run, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/opencode-kimi"])
    code, out, err = run("use-key", "3")
    assert code == 2 and out == ""
    assert err == "opencode-kimi: error: index 3 out of range (no keys configured)\n"
    code, out, _ = run("--help")
    assert "\nUsage: opencode-kimi " in out and "  opencode-kimi add-key" in out


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0s"), (1, "1s"), (45_000, "45s"), (252_000, "4m 12s"), (3_600_000, "1h 00m"),
     (7_500_000, "2h 05m"), (90_000_000, "1d 1h")],
)
def test_format_duration(ms, text):
    assert key_view.format_duration(ms) == text


@pytest.mark.slow
def test_python_dash_m_help():
    result = run_cli(None, "--help")  # its own process: python -m rotator.cli
    assert result.returncode == 0, result.stderr
    assert "\nUsage: kimi-rotator " in result.stdout
    for verb in ("add-key", "list-keys", "remove-key", "rotate", "use-key", "set-strategy",
                 "enable-key", "clear-limits"):
        assert verb in result.stdout


class ClosedPipe(io.StringIO):
    """Standard output after its reader went (`kimi-rotator usage | head -3`)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_a_reader_that_stops_early_gets_no_traceback(run, monkeypatch, capsys):
    write(run.path, three_keys())
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["--accounts", str(run.path), "list-keys"]) == 1  # no exception escapes
    assert capsys.readouterr().err == ""


def test_a_hint_names_the_store_a_person_must_change(tmp_path):
    """The commands the proxy and the CLI advise reach the store in use from another
    terminal: nothing for the default file, --accounts for another, --store for a team's."""
    from rotator.store import cli_command
    from rotator.store.file import FileStore, platform_accounts_path
    from rotator.store.redis_store import RedisStore

    assert cli_command(FileStore(platform_accounts_path()), "add-key KEY") == "kimi-rotator add-key KEY"
    odd = tmp_path / "my keys.json"
    assert cli_command(FileStore(odd), "add-key KEY") == f"kimi-rotator --accounts '{odd}' add-key KEY"
    team = RedisStore("redis://ops:s3cret@redis.lan:6380/2", "team:")
    assert cli_command(team, "list-keys") == (
        "kimi-rotator --store 'redis://ops:***@redis.lan:6380/2' --store-prefix team: list-keys")
