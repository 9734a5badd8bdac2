"""Hostile or broken text from outside (issue 13, defects 2, 3, 4 and remove-key of 12).

Upstream error bodies, the accounts file and the command line may carry lone UTF-16
surrogates, control characters, terminal escapes, bidi overrides, huge strings and
key-shaped text. None of it may crash a save, a verb or a hook, lose counts, or reach
the file, the log or the terminal raw. What a user sees is asserted: file bytes, CLI
output, log records.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy import io as mitm_io

import rotator.cli.main as cli
from rotator.core.keys import mask_key
from rotator.core.models import Account, AccountsFile
from rotator.proxy.addon import KimiRotator
from rotator.store import file as storage
from testbed.hooks import FakeClock, call_hook, kimi_flow, run_virtual
from tests.support.accounts import fake_key
from tests.support.harness import run_cli
from tests.support.in_process import addon_in_taddons

CLI_NOW = 1_750_000_000_000  # 2025-06-15: the CLI's clock here, before the wall clock (a stamp from the future reads as now)
KEY1 = fake_key("hostile1")
KEY2 = fake_key("hostile2")
KEY3 = fake_key("hostile3")
ECHOED = "sk-kimi-" + "E" * 40  # a key-shaped string Kimi might echo back
# Raw bytes a terminal acts on, and the forms JSON writes them in.
TERMINAL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
JSON_CONTROL_ESCAPE = re.compile(r"\\u00[01][0-9a-fA-F]|\\u00[89][0-9a-fA-F]|\\u202[a-eA-E]|\\[nrtbf]")
FULL_KEYS = (KEY1, KEY2, KEY3, ECHOED)


# -- the CLI, in process (tests.support.harness.run_cli) -------------------------------------------


class Cli:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, *args: str) -> tuple[int, str, str]:
        done = run_cli(self.path, *args, in_process=True)
        code, out, err = done.returncode, done.stdout, done.stderr
        for text in (out, err):
            assert not any(key in text for key in FULL_KEYS), text
        return code, out, err

    def ok(self, *args: str) -> str:
        code, out, err = self(*args)
        assert (code, err) == (0, ""), (code, out, err)
        return out

    def refused(self, *args: str) -> str:
        """A refusal: exit 2, nothing on stdout, one clean line on stderr."""
        code, out, err = self(*args)
        assert code == 2, (code, out, err)
        assert out == ""
        assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
        assert err.startswith("kimi-rotator: error: "), repr(err)
        assert not TERMINAL_CONTROL.search(err), repr(err)
        assert len(err) < 300, len(err)
        return err.rstrip("\n")


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setattr(cli, "now_ms", lambda: CLI_NOW)
    monkeypatch.setattr(sys, "argv", ["kimi-rotator"])
    monkeypatch.delenv("KIMI_ROTATOR_ACCOUNTS", raising=False)
    return Cli(tmp_path / "kimi-accounts.json")


def write_raw(path: Path, text: str) -> bytes:
    """`text` (JSON as the plugin's JSON.stringify writes it) as the accounts file."""
    raw = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    os.chmod(path, 0o600)
    return raw


def file_with(*accounts: dict[str, Any], **top: Any) -> str:
    return json.dumps({"version": 1, "accounts": list(accounts), "activeIndex": 0,
                       "rotationStrategy": "round-robin", **top}, indent=2)


def entry(key: str, name: str, **fields: Any) -> dict[str, Any]:
    return {"key": key, "name": name, "addedAt": CLI_NOW, "lastUsed": 0, "rateLimitResetTime": 0,
            "healthScore": 100, "consecutiveFailures": 0, "totalRequests": 7,
            "successfulRequests": 5, **fields}


def assert_clean_file(path: Path) -> dict[str, Any]:
    """The file is UTF-8 JSON, and no name or reason in it holds control text or a key."""
    raw = path.read_bytes()
    data = json.loads(raw.decode("utf-8"))  # strict: a lone surrogate byte would fail here
    for account in data["accounts"]:
        for field in ("name", "disabledReason", "cooldownReason"):
            value = account.get(field)
            if value is None:
                continue
            encoded = json.dumps(value, ensure_ascii=False)
            assert not TERMINAL_CONTROL.search(value), (field, value)
            assert not JSON_CONTROL_ESCAPE.search(encoded), (field, encoded)
            assert not any(key in value for key in FULL_KEYS), (field, value)
            assert len(value) <= 300, (field, len(value))
    return data


def block_headers(listing: str) -> list[str]:
    return [line for line in listing.splitlines() if re.match(r"[●○] \[\d+\]", line)]


# -- defect 2: lone surrogates ---------------------------------------------------------------


def test_a_half_emoji_name_in_the_file_does_not_break_write_verbs(run: Cli) -> None:
    # JSON.stringify writes half an emoji as a lone \ud83d escape.
    write_raw(run.path, file_with(entry(KEY1, "PLACEHOLDER_A"), entry(KEY2, "Home"))
              .replace("PLACEHOLDER_A", "Work \\ud83d"))
    out = run.ok("rotate")
    assert out.startswith("Rotated to [1] Home")
    data = assert_clean_file(run.path)
    assert data["activeIndex"] == 1
    assert data["accounts"][0]["name"] == "Work \ufffd"  # shown as a replacement mark
    assert [a["totalRequests"] for a in data["accounts"]] == [7, 7]  # nothing lost
    listing = run.ok("list-keys")
    assert "[0] Work \ufffd" in listing


def test_unknown_fields_holding_lone_surrogates_survive_a_save(run: Cli) -> None:
    # Fields the plugin writes that we don't know are kept, even broken ones.
    write_raw(run.path, file_with(entry(KEY1, "Work", lastError="PLACEHOLDER_B"))
              .replace("PLACEHOLDER_B", "bad \\udfff text"))
    run.ok("use-key", "0")
    raw = run.path.read_bytes()
    raw.decode("utf-8")  # valid UTF-8 on disk
    assert json.loads(raw)["accounts"][0]["lastError"] == "bad \udfff text"


def test_a_name_typed_in_a_latin1_terminal_is_refused_with_one_line(run: Cli) -> None:
    # `add-key KEY $'Caf\xe9'` under a UTF-8 locale: Python hands us "Caf\udce9".
    err = run.refused("add-key", KEY1, "Caf\udce9")
    assert "NAME" in err and "UTF-8" in err
    assert not run.path.exists()


def test_names_with_any_real_unicode_are_kept(run: Cli) -> None:
    run.ok("add-key", KEY1, "Café ☕ 🚀 東京")
    assert json.loads(run.path.read_text())["accounts"][0]["name"] == "Café ☕ 🚀 東京"


# -- defects 3 and 4 in the file and the CLI --------------------------------------------------

FORGED = "Work\n\n● [9] Forged\n   Key: sk-kim…AAAA"
HOSTILE_NAMES = [
    pytest.param(FORGED, id="newlines-forging-a-block"),
    pytest.param("Work\rHome", id="carriage-return"),
    pytest.param("\x1b[31mRed\x1b[0m", id="ansi-colour"),
    pytest.param("Work\x1b]52;c;aGVsbG8=\x07", id="osc52-clipboard"),
    pytest.param("Work \u202eexe.txt", id="rlo-override"),
    pytest.param("Work\x9b2J", id="c1-csi"),
    pytest.param("Work\x00", id="nul"),
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_add_key_refuses_control_characters_in_names(run: Cli, name: str) -> None:
    err = run.refused("add-key", KEY1, name)
    assert "NAME" in err
    assert not run.path.exists()


def test_add_key_refuses_a_huge_name(run: Cli) -> None:
    err = run.refused("add-key", KEY1, "A" * 100_000)
    assert "NAME" in err and "100000" in err
    assert not run.path.exists()


def test_a_bad_key_argument_is_not_echoed_raw(run: Cli) -> None:
    err = run.refused("add-key", "\x1b]52;c;aGVsbG8=\x07\x1b[2J", "Name")
    assert "not a Kimi API key" in err


def test_hostile_text_already_in_the_file_is_shown_clean(run: Cli) -> None:
    write_raw(run.path, file_with(
        entry(KEY1, FORGED, disabledReason=f"key rejected\n\x1b[31m● [7] x {ECHOED}\u202e" + "y" * 5000),
        entry(KEY2, "\x1b]52;c;aGVsbG8=\x07Home", rateLimitResetTime=CLI_NOW + 60_000,
              cooldownReason="rate limited\r\n\x1b[2J"),
    ))
    listing = run.ok("list-keys")
    assert not TERMINAL_CONTROL.search(listing), repr(listing)
    assert len(block_headers(listing)) == 2, listing
    assert ECHOED not in listing
    # One line; the key-shaped run (glued to the y's once the RLO is gone) masked.
    assert "   Status: ✗ Disabled: key rejected ● [7] x sk-kim…yyyy\n" in listing
    assert "● [0] Work ● [9] Forged    Key: sk-kim…AAAA\n" in listing
    assert max(len(line) for line in listing.splitlines()) < 400
    doc = json.loads(run.ok("list-keys", "--json"))
    assert not TERMINAL_CONTROL.search(json.dumps(doc, ensure_ascii=False))
    # A write verb saves the names and reasons clean.
    run.ok("use-key", "1")
    assert_clean_file(run.path)


# -- defect 12: remove-key removes what the person saw ----------------------------------------


def three(run: Cli) -> bytes:
    return write_raw(run.path, file_with(entry(KEY1, "One"), entry(KEY2, "Two"), entry(KEY3, "Three")))


def test_remove_key_refuses_when_the_index_no_longer_names_the_expected_key(run: Cli) -> None:
    three(run)
    run.ok("remove-key", "0")  # another terminal removed [0] meanwhile: Three is now [1]
    raw = run.path.read_bytes()
    err = run.refused("remove-key", "1", "--expect", "Two")
    assert "Three" in err and "Two" in err
    assert run.path.read_bytes() == raw  # nothing written


def test_remove_key_with_a_matching_expectation_removes_it(run: Cli) -> None:
    three(run)
    out = run.ok("remove-key", "1", "--expect", "Two")
    assert out.startswith(f"Removed [1] Two ({mask_key(KEY2)})")
    out = run.ok("remove-key", "1", "--expect", mask_key(KEY3))
    assert out.startswith(f"Removed [1] Three ({mask_key(KEY3)})")
    assert [a["name"] for a in json.loads(run.path.read_text())["accounts"]] == ["One"]


@pytest.mark.parametrize("target", ["Two", mask_key(KEY2), mask_key(KEY2).replace("…", "...")])
def test_remove_key_takes_a_name_or_a_masked_key(run: Cli, target: str) -> None:
    three(run)
    run.ok("remove-key", "0")  # indexes shift; names and masks don't
    out = run.ok("remove-key", target)
    assert out.startswith(f"Removed [0] Two ({mask_key(KEY2)})")
    assert [a["name"] for a in json.loads(run.path.read_text())["accounts"]] == ["Three"]


def test_remove_key_refuses_an_ambiguous_or_unknown_name(run: Cli) -> None:
    raw = write_raw(run.path, file_with(entry(KEY1, "Work"), entry(KEY2, "Work")))
    err = run.refused("remove-key", "Work")
    assert "2 keys" in err and "[0]" in err and "[1]" in err
    err = run.refused("remove-key", "Nobody")
    assert "'Nobody' is neither an INDEX" in err
    assert run.path.read_bytes() == raw


# -- the proxy, in process ------------------------------------------------------------------


class Upstream:
    """Plays mitmproxy and Kimi for the addon's own resends."""

    def __init__(self, answers: dict[str, http.Response]) -> None:
        self.answers = answers
        self.addon: KimiRotator | None = None

    async def __call__(self, flow: http.HTTPFlow) -> None:
        assert self.addon is not None
        await call_hook(self.addon, "request", flow)
        if flow.response is None:
            await self.answer(flow)

    async def answer(self, flow: http.HTTPFlow) -> None:
        assert self.addon is not None
        key = flow.request.headers.get("x-api-key", "")
        flow.response = self.answers[key].copy()
        await call_hook(self.addon, "responseheaders", flow)
        await call_hook(self.addon, "response", flow)


def hostile_body(type_text: str, message_text: str) -> str:
    # Written by hand: JSON escapes exactly as a hostile server may send them.
    return '{"type":"error","error":{"type":"%s","message":"%s"}}' % (type_text, message_text)


def hostile_401(type_text: str, message_text: str, status: int = 401) -> http.Response:
    body = hostile_body(type_text, message_text)
    return http.Response.make(status, body.encode(), {"content-type": "application/json"})


OK = http.Response.make(200, b'{"type":"message"}', {"content-type": "application/json"})


async def exchange(tmp_path: Path, first: http.Response) -> tuple[Path, http.HTTPFlow, KimiRotator]:
    """One client request: KEY1 answers `first`, KEY2 succeeds; then a save."""
    path = tmp_path / "accounts.json"
    storage.write_accounts(path, AccountsFile(accounts=[Account(key=KEY1, name="One"),
                                                        Account(key=KEY2, name="Two")],
                                              rotation_strategy="round-robin"))
    clock = FakeClock()
    upstream = Upstream({KEY1: first, KEY2: OK})
    with addon_in_taddons(path, clock=clock, send=upstream, kimi_hosts=["api.kimi.com"]) as (addon, _):
        flow = kimi_flow()
        await call_hook(addon, "request", flow)
        await run_virtual(clock, upstream.answer(flow))
        assert addon.sync is not None
        await addon.sync.save_once()
    return path, flow, addon


def dumps_whole(flow: http.HTTPFlow) -> bytes:
    out = io.BytesIO()
    mitm_io.FlowWriter(out).add(flow)
    raw = out.getvalue()
    assert len(list(mitm_io.FlowReader(io.BytesIO(raw)).stream())) == 1
    return raw


async def test_lone_surrogates_in_an_upstream_error_are_retried_and_counted(tmp_path: Path) -> None:
    path, flow, _ = await exchange(tmp_path, hostile_401("\\udfff\\ud83d", "slow down \\udfff", 429))
    assert flow.response is not None and flow.response.status_code == 200  # retried on KEY2
    data = assert_clean_file(path)
    first, second = data["accounts"]
    assert first["totalRequests"] == 1
    assert first["cooldownReason"] == "HTTP 429: rate limited: \ufffd\ufffd: slow down \ufffd"
    assert (second["totalRequests"], second["successfulRequests"]) == (1, 1)
    dumps_whole(flow)  # the flow, reasons and all, can be saved with -w


async def test_lone_surrogates_in_an_unrecognised_error_reach_the_reason_clean(tmp_path: Path) -> None:
    path, flow, _ = await exchange(tmp_path, hostile_401("auth\\udfff", "nope \\ud83d"))
    assert flow.response is not None and flow.response.status_code == 200
    first = assert_clean_file(path)["accounts"][0]
    assert first["disabledReason"] == "HTTP 401: key not accepted: auth\ufffd: nope \ufffd"
    dumps_whole(flow)


async def test_escapes_and_keys_from_upstream_reach_no_file_log_or_listing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    forged = "\\n\\u001b[31m\\u25cf [7] Forged\\r\\n   Key: " + ECHOED + "\\u202e\\u001b]52;c;aGk=\\u0007"
    caplog.set_level(logging.INFO)
    path, flow, _ = await exchange(tmp_path, hostile_401("x" * 3000 + forged, "who are you" + forged))
    first = assert_clean_file(path)["accounts"][0]
    assert first["disabledReason"].startswith("HTTP 401: key not accepted: xxx")
    path, flow, _ = await exchange(tmp_path, hostile_401("auth" + forged, "who are you" + forged))
    reason = assert_clean_file(path)["accounts"][0]["disabledReason"]
    assert reason.startswith("HTTP 401: key not accepted: auth")
    assert mask_key(ECHOED) in reason
    for record in caplog.records:
        text = record.getMessage()
        assert not TERMINAL_CONTROL.search(text), repr(text)
        assert not any(key in text for key in FULL_KEYS), text
    assert any("disabled" in r.getMessage() for r in caplog.records)
    raw = dumps_whole(flow)
    assert ECHOED.encode() not in raw
    # The listing shows two blocks, not a forged third.
    monkeypatch.setattr(sys, "argv", ["kimi-rotator"])
    listed = run_cli(path, "list-keys", in_process=True)
    assert listed.returncode == 0, listed.stderr
    listing = listed.stdout
    assert len(block_headers(listing)) == 2, listing
    assert not TERMINAL_CONTROL.search(listing), repr(listing)
    assert ECHOED not in listing


def test_a_key_with_control_characters_in_the_file_is_shown_printable(run: Cli) -> None:
    write_raw(run.path, file_with(entry("sk-kimi-\x1b[2J" + "A" * 30 + "\x07\x1b", "Odd")))
    code, listing, err = run("list-keys")
    assert code == 0 and "   Key: sk-kim…AA??\n" in listing
    # Such a key is never sent (a line break in it would inject headers): said once, printable.
    assert err == (f"kimi-rotator: warning: {run.path}: key [0] (sk-kim…AA??) is never used: its key holds "
                   "spaces, line breaks or other characters no key has; fix it in the file\n"), err
    code, out, err = run("use-key", "0")
    assert code == 0 and "sk-kim…AA??" in out


# -- end to end: a real mitmdump in front of the fake Kimi -------------------------------------


def test_hostile_upstream_errors_leave_log_file_and_dump_clean(
    fake_kimi: Any, keys: list[str], write_accounts: Any, start_proxy: Any, tmp_path: Path,
) -> None:
    import httpx

    from tests.support.harness import saved_flows

    path = write_accounts(keys)
    forged = "\\n\\u001b[31m\\u25cf [7] Forged\\r\\n   Key: " + ECHOED + " \\u202e\\u001b]52;c;aGk=\\u0007"
    json_headers = {"content-type": "application/json"}
    fake_kimi.set_response(keys[0], 401, hostile_body("auth\\udfff" + forged, "who?" + forged),
                           json_headers, times=1)
    fake_kimi.set_response(keys[1], 429, hostile_body("\\ud83d" + forged, "\\udfff" + forged),
                           json_headers, times=1)
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, extra_args=("-w", str(dump)))
    request = {"model": "kimi-for-coding", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(trust_env=False, timeout=30) as client:
        statuses = [client.post(proxy.url + "/coding/v1/messages", json=request,
                                headers={"x-api-key": "sk-kimi-placeholder"}).status_code
                    for _ in range(2)]
    assert statuses == [200, 200]  # both retried on a good key
    assert proxy.stop() == 0, proxy.output()
    log = proxy.output()
    assert "Traceback" not in log and "rror" not in log.replace("_error", ""), log
    assert not TERMINAL_CONTROL.search(log), repr(log)
    assert ECHOED not in log and mask_key(ECHOED) in log
    assert "disabled: HTTP 401: key not accepted: auth\ufffd" in log
    data = assert_clean_file(path)
    counts = [(a["totalRequests"], a["successfulRequests"]) for a in data["accounts"]]
    assert sum(total for total, _ in counts) == 4 and sum(ok for _, ok in counts) == 2, counts
    assert data["accounts"][0]["disabledReason"].startswith("HTTP 401: key not accepted: auth\ufffd")
    _, flows = saved_flows(dump)  # every flow saved, reasons and all
    assert len(flows) == 4, flows  # two client flows, two resends
    # What the addon wrote on them (Kimi's bodies are kept as Kimi sent them).
    ours = json.dumps([(f.comment, f.metadata) for f in flows], ensure_ascii=False)
    assert ECHOED not in ours and not TERMINAL_CONTROL.search(ours), ours
    assert "\\ufffd" in json.dumps([f.metadata for f in flows])
