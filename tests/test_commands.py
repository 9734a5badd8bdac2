"""The mitmproxy commands (kimi.status, kimi.enable, ...) through mitmproxy's test context,
against a real accounts file: each one's effect in memory at once and on disk after its
save, a person's change outliving the proxy's older ones, bad input, masked keys only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from rotator.core import edit_stamps, policy
from rotator.core.models import Account, AccountsFile
from rotator.pool.lease import Lease
from rotator.proxy.addon import KimiRotator
from rotator.store.file import read_accounts, write_accounts
from testbed.hooks import FakeClock
from tests.support.accounts import KEYS
from tests.support.in_process import addon_in_taddons

INVALID = b'{"error":{"type":"invalid_authentication_error","message":"Invalid Authentication"}}'
SECOND = 1000


class Running:
    """A KimiRotator in mitmproxy's test context, on a fake clock and an accounts file."""

    def __init__(self, tctx: taddons.context, rotator: KimiRotator, clock: FakeClock, path: Path) -> None:
        self.tctx = tctx
        self.rotator = rotator
        self.clock = clock
        self.path = path
        self.said: list[Any] = []

    def run(self, text: str) -> Any:
        """A command as the console and mitmweb run it: by name, arguments as strings."""
        result = self.tctx.master.commands.execute(text)
        self.said.append(result)
        self.clock.advance(SECOND)  # a person types the next one later
        return result

    async def saved(self) -> None:
        assert self.rotator.sync is not None
        await self.rotator.sync.saved()

    async def save(self) -> None:
        assert self.rotator.sync is not None
        await self.rotator.sync.save_once()

    def refuse(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> Lease:
        """One request on the key the pool chooses, answered `status`."""
        now = self.clock.now_ms()
        lease = self.rotator.pool.acquire(now)
        assert isinstance(lease, Lease)
        self.rotator.pool.release(lease, policy.classify(status, headers or {}, body, now), now)
        self.clock.advance(SECOND)
        return lease

    def on_disk(self) -> AccountsFile:
        return read_accounts(self.path)

    @property
    def memory(self) -> AccountsFile:
        return self.rotator.pool.state


@pytest.fixture
def running(tmp_path: Path) -> Any:
    with contextlib.ExitStack() as stack:

        async def start(strategy: str = "sticky", keys: list[str] = KEYS) -> Running:
            path = tmp_path / "accounts.json"
            write_accounts(path, AccountsFile(
                accounts=[Account(key=k, name=f"k{i}") for i, k in enumerate(keys)], rotation_strategy=strategy,
            ))
            clock = FakeClock()
            rotator, tctx = stack.enter_context(addon_in_taddons(path, clock=clock))
            return Running(tctx, rotator, clock, path)

        yield start


def never_a_full_key(*texts: Any) -> None:
    blob = repr(texts)
    for key in KEYS:
        assert key not in blob
        assert key[6:-4] not in blob  # not even the middle of one


# -- each command: in memory at once, on disk after its save ------------------------------


async def test_status_is_one_masked_line_per_key_with_state_and_countdown(running, caplog) -> None:
    r = await running()
    r.refuse(429, b'{"error":{"message":"rate limited"}}', {"retry-after": "90"})  # key 0 cools
    r.memory.accounts[2].disabled_reason = "key rejected as invalid"
    with caplog.at_level(logging.INFO):
        lines = r.run("kimi.status")
    assert len(lines) == 3
    assert lines[0].startswith("● [0] k0 (sk-kim…") and ": cooling and in use, free in 1m 29s (HTTP 429" in lines[0]
    # One word each: "ready" is usable, "in use" is the key the pool is on (issue 27).
    assert lines[1].startswith("○ [1] k1") and ": ready, health 100%" in lines[1]
    assert "disabled (key rejected as invalid); kimi.enable 2" in lines[2]
    never_a_full_key(lines, caplog.text)


async def test_in_mitmweb_status_is_a_summary_and_the_lines_go_to_the_event_log(running, caplog, monkeypatch) -> None:
    from rotator.proxy import commands

    r = await running()
    monkeypatch.setattr(commands, "_in_mitmweb", lambda: True)
    with caplog.at_level(logging.INFO):
        said = r.run("kimi.status")
    assert said == ["3 keys: 3 ready; in use: [0] k0; each key's line is in the event log"]
    assert caplog.text.count("kimi-rotator: ○ [") == 2 and "kimi-rotator: ● [0] k0" in caplog.text


async def test_command_help_has_no_runs_of_spaces(running) -> None:
    r = await running()
    helps = {name: c.help for name, c in r.tctx.master.commands.commands.items() if name.startswith("kimi.")}
    assert len(helps) >= 7
    for name, text in helps.items():
        assert text and "  " not in text.replace("\n", " "), (name, text)


async def test_a_broken_file_is_said_first_and_no_key_advice_that_would_fail(running, tmp_path) -> None:
    """Issue 27: with the accounts file unreadable, the status says what is wrong with it and
    that the proxy serves from its last good state, not "add a key" (the CLI refuses a
    broken file); /status.json carries the same line for the page's banner."""
    from rotator.status import document

    r = await running()
    r.path.write_text("{ not json")
    sync = r.rotator.sync
    assert sync is not None
    await sync._save()  # the next save finds it broken
    lines = r.run("kimi.status")
    assert lines[0].startswith(f"cannot read the accounts file {r.path}: not valid JSON")
    assert "serving from the last good state" in lines[0] and len(lines) == 4
    doc = document.status_document(r.rotator.status_page.snapshot())
    assert doc["store"] == {"location": str(r.path), "problem": lines[0]}

    empty = await running(keys=[])
    empty.path.write_text("{ not json")
    assert empty.rotator.sync is not None
    await empty.rotator.sync._save()
    said = empty.run("kimi.status")
    assert len(said) == 1 and "no keys to serve" in said[0] and "add-key" not in said[0]


async def test_status_without_keys_says_how_to_add_one(running) -> None:
    r = await running(keys=[])
    # The command names the file this proxy reads (issue 27).
    assert r.run("kimi.status") == [
        f"no Kimi API keys configured; add one with: kimi-rotator --accounts {r.path} add-key sk-kimi-…"
    ]


async def test_use_moves_the_next_request_and_the_file(running) -> None:
    r = await running()
    message = r.run("kimi.use 2")
    assert message.startswith("Now using [2] k2 (sk-kim…")
    assert r.memory.active_index == 2
    lease = r.rotator.pool.acquire(r.clock.now_ms())
    assert isinstance(lease, Lease) and lease.key == KEYS[2]  # the very next request
    await r.saved()
    disk = r.on_disk()
    assert disk.active_index == 2 and edit_stamps.disk_name("active_index") in disk.edited_at
    assert r.rotator.sync is not None and r.rotator.sync.pending_ops == 0


async def test_rotate_moves_to_the_key_after_the_active_one(running) -> None:
    r = await running()
    assert r.run("kimi.rotate").startswith("Rotated to [1] k1")
    assert r.run("kimi.rotate").startswith("Rotated to [2] k2")
    assert r.memory.active_index == 2
    await r.saved()
    assert r.on_disk().active_index == 2  # twice, not once: each rotate saved as it was seen
    assert r.run("kimi.rotate").startswith("Rotated to [0] k0")
    await r.saved()
    assert r.on_disk().active_index == 0 == r.memory.active_index


async def test_strategy_changes_how_keys_are_picked_now_and_on_disk(running) -> None:
    r = await running(strategy="sticky")
    assert r.run("kimi.strategy round-robin") == "Rotation strategy set to: round-robin"
    assert r.memory.rotation_strategy == "round-robin"
    picked = []
    for _ in range(3):
        lease = r.rotator.pool.acquire(r.clock.now_ms())
        assert isinstance(lease, Lease)
        picked.append(lease.key)
    assert picked == KEYS  # round-robin at once: sticky would have stayed on key 0
    await r.saved()
    disk = r.on_disk()
    assert disk.rotation_strategy == "round-robin" and "rotationStrategy" in disk.edited_at


async def test_clear_one_key_frees_it_for_the_next_request(running) -> None:
    r = await running()
    r.refuse(429, b'{"error":{"message":"rate limited"}}', {"retry-after": "600"})
    await r.save()
    assert r.on_disk().accounts[0].rate_limit_reset_time > r.clock.now_ms()
    assert r.run("kimi.clear 0").startswith("Cleared rate limits on [0] k0")
    account = r.memory.accounts[0]
    assert (account.rate_limit_reset_time, account.cooldown_level, account.cooldown_reason) == (0, 0, None)
    r.rotator.pool.state.active_index = 0
    lease = r.rotator.pool.acquire(r.clock.now_ms())
    assert isinstance(lease, Lease) and lease.key == KEYS[0]
    await r.saved()
    on_disk = r.on_disk().accounts[0]
    assert (on_disk.rate_limit_reset_time, on_disk.cooldown_level, on_disk.cooldown_reason) == (0, 0, None)


async def test_clear_resets_a_half_open_key_so_its_cap_of_one_goes(running) -> None:
    r = await running(keys=KEYS[:1])
    r.refuse(429, b'{"error":{"message":"rate limited"}}', {"retry-after": "1"})
    r.clock.advance(2 * SECOND)  # the cooldown ended: half-open, one request at a time
    first = r.rotator.pool.acquire(r.clock.now_ms())
    assert isinstance(first, Lease)
    assert not isinstance(r.rotator.pool.acquire(r.clock.now_ms()), Lease)  # at its cap of one
    r.run("kimi.clear ALL")
    assert isinstance(r.rotator.pool.acquire(r.clock.now_ms()), Lease)  # the pool's caps follow
    await r.saved()
    assert r.on_disk().accounts[0].cooldown_level == 0


async def test_clear_all_clears_every_key(running) -> None:
    r = await running(strategy="round-robin")
    for _ in KEYS:
        r.refuse(429, b'{"error":{"message":"rate limited"}}', {"retry-after": "600"})
    assert r.run("kimi.clear all") == "Cleared rate limits on all 3 keys."
    assert all(a.rate_limit_reset_time == 0 for a in r.memory.accounts)
    await r.saved()
    await r.save()
    assert all(a.rate_limit_reset_time == 0 for a in r.on_disk().accounts)
    assert all(a.rate_limit_reset_time == 0 for a in r.memory.accounts)


# -- the acceptance scenario: a person's enable outlives the proxy's disable ---------------


async def test_enable_after_a_401_disable_still_in_memory_stays_enabled(running) -> None:
    r = await running()
    r.refuse(401, INVALID)
    assert r.memory.accounts[0].disabled_reason is not None  # pending, not saved yet
    message = r.run("kimi.enable 0")
    assert message.startswith("Enabled [0] k0") and "was disabled: key rejected as invalid" in message
    assert r.memory.accounts[0].disabled_reason is None
    assert r.rotator.pool.peek(r.clock.now_ms()) == 0  # the next request may use it
    await r.saved()
    for _ in range(2):  # the next merges, whatever the proxy had pending, keep it enabled
        assert r.on_disk().accounts[0].disabled_reason is None
        assert r.memory.accounts[0].disabled_reason is None
        await r.save()
    assert r.on_disk().accounts[0].total_requests == 1  # the proxy's count kept


async def test_enable_after_a_401_disable_already_saved_stays_enabled(running) -> None:
    r = await running()
    r.refuse(401, INVALID)
    await r.save()
    assert r.on_disk().accounts[0].disabled_reason is not None  # saved: the file says disabled
    r.run("kimi.enable 0")
    await r.saved()
    await r.save()
    assert r.on_disk().accounts[0].disabled_reason is None
    assert "disabledReason" in r.on_disk().accounts[0].edited_at
    assert r.memory.accounts[0].disabled_reason is None


async def test_enable_while_a_save_of_the_disable_is_under_way_is_not_undone(running) -> None:
    r = await running()
    r.refuse(401, INVALID)
    assert r.rotator.sync is not None
    under_way = asyncio.ensure_future(r.rotator.sync.save_once())  # takes the disable with it
    await asyncio.sleep(0)
    r.run("kimi.enable 0")
    await under_way  # it adopts the file with the key disabled...
    assert r.memory.accounts[0].disabled_reason is None  # ...and the person's change is made again
    await r.saved()
    assert r.on_disk().accounts[0].disabled_reason is None


async def test_a_later_401_disables_the_key_again(running) -> None:
    r = await running()
    r.refuse(401, INVALID)
    r.run("kimi.enable 0")
    await r.saved()
    r.refuse(401, INVALID)  # after the person's change: the proxy's counts
    await r.save()
    assert r.on_disk().accounts[0].disabled_reason is not None


async def test_a_change_the_store_cannot_take_yet_stays_in_memory_and_is_saved_later(running, caplog) -> None:
    r = await running()
    r.refuse(401, INVALID)
    await r.save()
    good = r.path.read_bytes()
    r.path.write_text("{broken")
    r.run("kimi.enable 0")
    with caplog.at_level(logging.INFO):
        await r.saved()
        await r.save()
    assert r.rotator.sync is not None and r.rotator.sync.pending_ops == 1
    assert r.memory.accounts[0].disabled_reason is None
    r.path.write_bytes(good)  # fixed: the file still says disabled
    await r.save()
    assert r.rotator.sync.pending_ops == 0
    assert r.on_disk().accounts[0].disabled_reason is None
    assert r.memory.accounts[0].disabled_reason is None


async def test_a_change_aimed_at_a_key_removed_meanwhile_touches_no_other_key(running, caplog) -> None:
    r = await running()
    r.refuse(401, INVALID)
    await r.save()
    r.run("kimi.enable 0")
    # The CLI removed key 0 before the save: key 1 is now at [0] and must stay as it is.
    state = r.on_disk()
    state.accounts[1].disabled_reason = "banned"
    del state.accounts[0]
    write_accounts(r.path, state)
    with caplog.at_level(logging.WARNING):
        await r.saved()
    assert "not saved" in caplog.text and "no longer in the list" in caplog.text
    assert [a.disabled_reason for a in r.on_disk().accounts] == ["banned", None]
    never_a_full_key(caplog.text)


# -- usage, logging, bad input ---------------------------------------------------------------


async def test_usage_starts_a_poll_of_every_key(running, caplog) -> None:
    r = await running()
    asked: list[int] = []
    r.rotator.polls = types.SimpleNamespace(poll_now=lambda: asked.append(1) or 3)  # type: ignore[assignment]
    with caplog.at_level(logging.INFO):
        assert r.run("kimi.usage") == "asking Kimi for the quota of 3 keys"
    assert asked == [1] and "asking Kimi for the quota of 3 keys" in caplog.text


async def test_usage_with_the_proxys_own_polls(running) -> None:
    r = await running()
    polls = getattr(r.rotator, "polls", None)
    if not hasattr(polls, "poll_now"):
        pytest.skip("KimiRotator.polls.poll_now is not there yet")
    assert isinstance(r.run("kimi.usage"), str)


async def test_each_change_is_logged_at_alert_for_the_timeline(running, caplog) -> None:
    r = await running()
    with caplog.at_level(logging.INFO):
        for text in ("kimi.use 1", "kimi.rotate", "kimi.enable 1", "kimi.clear 1", "kimi.strategy sticky"):
            r.run(text)
        await r.saved()
    alerts = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.INFO + 1]
    said = [f"kimi-rotator: {s}" for s in r.said]
    assert all(s in alerts for s in said)
    never_a_full_key(caplog.text, r.said)


@pytest.mark.parametrize(
    "text, message",
    [
        ("kimi.use 3", r"kimi.use: index 3 out of range \(3 keys: 0-2\)"),
        ("kimi.enable -1", r"kimi.enable: index -1 out of range"),
        ("kimi.use two", r"invalid literal for int"),
        ("kimi.clear foo", r"kimi.clear: expected an index \(a whole number 0 or more\) or 'all', got 'foo'"),
        ("kimi.clear 7", r"kimi.clear: index 7 out of range"),
        ("kimi.strategy fastest", r"unknown strategy 'fastest' \(choose one of: round-robin, health-based, sticky\)"),
        ("kimi.use", r"argument mismatch|missing"),
    ],
)
async def test_bad_input_is_a_command_error_and_changes_nothing(running, text, message) -> None:
    r = await running()
    before = r.path.read_bytes()
    memory = r.memory.model_dump_json()
    with pytest.raises(exceptions.CommandError, match=message):
        r.run(text)
    await r.saved()
    assert r.path.read_bytes() == before and r.memory.model_dump_json() == memory


async def test_a_key_shaped_argument_is_not_echoed_in_full(running) -> None:
    r = await running()
    with pytest.raises(exceptions.CommandError) as refused:
        r.run(f"kimi.clear {KEYS[1]}")
    never_a_full_key(str(refused.value))


async def test_commands_without_keys_explain(running) -> None:
    r = await running(keys=[])
    with pytest.raises(exceptions.CommandError, match="no keys configured"):
        r.run("kimi.rotate")
    with pytest.raises(exceptions.CommandError, match=r"index 0 out of range \(no keys configured\)"):
        r.run("kimi.enable 0")
