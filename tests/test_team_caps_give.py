"""Team-wide in-flight caps in process (`rotator.sync.team_caps.TeamCaps`): a fake set of team
slots and a fake clock, a real pool. What each request takes and gives back, when the
slots given back are sent (with the next take, after GIVE_DELAY_MS, at once when this
proxy filled the cap), a key the team holds at its cap skipped and back, and the store
going away and coming back."""

from __future__ import annotations

import asyncio
import logging

import pytest

from rotator.core import policy
from rotator.core.models import Account, AccountsFile
from rotator.pool.events import PoolListeners
from rotator.pool.key_pool import KeyPool
from rotator.pool.waitline import ABANDONED, WaitLine
from rotator.store import StoreError
from rotator.store.urls import key_id
from rotator.sync import team_caps
from rotator.sync.team_caps import GIVE_DELAY_MS, HOLD_MS, TeamCaps
from testbed.hooks import FakeClock
from tests.support.accounts import NOW, fake_keys

KEYS = fake_keys(2)
OK = policy.classify(200, {}, b"{}", NOW)


class FakeSlots:
    """TeamSlots that answer at once: takes refused while `full` holds the key, calls
    raising StoreError while `down`; gives queue until a take or a flush carries them."""

    def __init__(self) -> None:
        self.ttl_ms = 30_000
        self.full: set[str] = set()
        self.down = False
        self.filled_cap = False  # what give answers: this proxy's take filled the cap
        self.takes: list[tuple[str, int, list[str]]] = []  # key, cap, gives carried
        self.flushes: list[list[str]] = []
        self.flush_calls = 0
        self.queued: list[str] = []
        self.closed = False

    @property
    def unsent(self) -> int:
        return len(self.queued)

    async def take(self, key: str, cap: int) -> bool:
        if self.down:
            raise StoreError("team store: connection refused")
        carried, self.queued = self.queued, []
        self.takes.append((key, cap, carried))
        return key not in self.full

    def give(self, key: str, cap: int) -> bool:
        self.queued.append(key)
        return self.filled_cap

    async def flush(self) -> None:
        self.flush_calls += 1
        if self.down:
            raise StoreError("team store: connection refused")
        if self.queued:
            self.flushes.append(self.queued)
            self.queued = []

    async def refresh(self) -> None:
        if self.down:
            raise StoreError("team store: connection refused")

    async def ping(self) -> None:
        await self.refresh()

    async def close(self) -> None:
        self.closed = True


def _setup() -> tuple[KeyPool, FakeSlots, FakeClock, TeamCaps]:
    clock = FakeClock(NOW)
    listeners = PoolListeners()
    pool = KeyPool(AccountsFile(accounts=[Account(key=k, name=f"k{i}") for i, k in enumerate(KEYS)],
                                rotation_strategy="round-robin"), clock=clock, listener=listeners)
    slots = FakeSlots()
    caps = TeamCaps(pool, slots, clock)
    listeners.add(caps)  # as rotator.proxy.assembly wires a team store
    return pool, slots, clock, caps


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_a_slot_given_back_rides_with_the_next_take_or_goes_after_the_delay():
    async def run() -> None:
        pool, slots, clock, caps = _setup()
        first = pool.acquire(NOW)
        assert await caps.admit(first)
        assert slots.takes == [(KEYS[0], pool.team_cap(KEYS[0]), [])]
        pool.release(first, OK, NOW)
        await _settle()
        assert slots.queued == [KEYS[0]] and slots.flushes == []  # not sent yet
        second = pool.acquire(NOW)
        assert await caps.admit(second)
        assert slots.takes[-1][2] == [KEYS[0]]  # carried by the next take
        clock.advance(GIVE_DELAY_MS)
        await _settle()
        assert slots.flush_calls == 0  # nothing left to send: the planned send was dropped
        pool.release(second, OK, NOW)
        clock.advance(GIVE_DELAY_MS - 1)
        await _settle()
        assert slots.flushes == []
        clock.advance(1)
        await _settle()
        assert slots.flushes == [[KEYS[1]]]  # no take came: sent on its own
        await caps.stop()

    asyncio.run(run())


def test_a_slot_on_a_key_this_proxy_filled_goes_back_at_once():
    async def run() -> None:
        pool, slots, clock, caps = _setup()
        slots.filled_cap = True
        lease = pool.acquire(NOW)
        assert await caps.admit(lease)
        pool.release(lease, OK, NOW)
        await _settle()
        assert slots.flushes == [[KEYS[0]]]  # another proxy may be waiting for it
        await caps.stop()

    asyncio.run(run())


def test_a_key_the_team_holds_at_its_cap_is_skipped_until_freed_or_held_long_enough():
    async def run() -> None:
        pool, slots, clock, caps = _setup()
        slots.full.add(KEYS[0])
        lease = pool.acquire(NOW)
        assert lease.key == KEYS[0]
        assert not await caps.admit(lease)
        assert pool.accounts[0].total_requests == 0  # handed back uncounted
        assert pool.acquire(NOW).key == KEYS[1]  # skipped
        caps.freed(key_id(KEYS[0]))  # a notice: another proxy gave a slot back
        again = pool.acquire(NOW)
        assert again.key == KEYS[0]
        # Refused again; no notice this time: back after HOLD_MS all the same.
        assert not await caps.admit(again)
        assert all(pool.acquire(NOW).key == KEYS[1] for _ in range(2))
        clock.advance(HOLD_MS)
        assert KEYS[0] in {pool.acquire(NOW).key for _ in range(2)}
        # Nothing was given back for the refused requests.
        await _settle()
        assert slots.queued == [] and slots.flushes == []
        await caps.stop()

    asyncio.run(run())


def test_the_store_away_costs_no_request_and_caps_come_back(monkeypatch, caplog):
    monkeypatch.setattr(team_caps, "RETRY_FIRST_S", 0.001)

    async def run() -> None:
        pool, slots, clock, caps = _setup()
        slots.down = True
        with caplog.at_level(logging.INFO):
            lease = pool.acquire(NOW)
            assert await caps.admit(lease)  # goes, under this proxy's own caps
            assert await caps.admit(pool.acquire(NOW))
            assert len(slots.takes) == 0
            pool.release(lease, OK, NOW)  # held no slot: gives nothing back
            await _settle()
            assert slots.queued == []
            slots.down = False
            for _ in range(200):
                if caps.away is None:
                    break
                await asyncio.sleep(0.005)
            assert caps.away is None
            assert await caps.admit(pool.acquire(NOW))
            assert len(slots.takes) == 1
        warnings = [r for r in caplog.records if "team-wide in-flight caps paused" in r.getMessage()]
        assert len(warnings) == 1
        assert any("hold again" in r.getMessage() for r in caplog.records)
        await caps.stop()

    asyncio.run(run())


def test_stop_drops_the_planned_send_and_closes_the_slots():
    async def run() -> None:
        pool, slots, clock, caps = _setup()
        lease = pool.acquire(NOW)
        assert await caps.admit(lease)
        pool.release(lease, OK, NOW)
        await caps.stop()
        assert slots.closed
        clock.advance(GIVE_DELAY_MS)
        await _settle()
        assert slots.flushes == []  # the slots' close gives back what is left
        later = pool.acquire(NOW)
        pool.release(later, OK, NOW)
        assert slots.queued == [KEYS[0]]  # from before stop; nothing new queued

    asyncio.run(run())


@pytest.mark.parametrize("filled", [False, True])
def test_every_slot_taken_is_given_back_once(filled):
    async def run() -> None:
        pool, slots, clock, caps = _setup()
        slots.filled_cap = filled
        leases = [pool.acquire(NOW) for _ in range(6)]
        for lease in leases:
            assert await caps.admit(lease)
        for lease in leases:
            pool.release(lease, OK, NOW)
        clock.advance(GIVE_DELAY_MS)
        await _settle()
        given = sorted(sum(slots.flushes, []) + slots.queued)
        assert given == sorted(lease.key for lease in leases)
        await caps.stop()

    asyncio.run(run())


def test_a_new_slot_lifetime_refreshes_at_once_and_then_at_its_own_pace():
    async def run() -> tuple[int, int]:
        pool, slots, clock, caps = _setup()
        refreshed: list[int] = []

        async def refresh() -> None:
            refreshed.append(slots.ttl_ms)

        slots.refresh = refresh  # type: ignore[method-assign]
        caps.start()
        await _settle()
        caps.set_ttl(60)  # kimi_slot_ttl lowered from 30 s: the 10-s wait is not kept
        await _settle()
        at_once = len(refreshed)
        for _ in range(200):
            if len(refreshed) >= 4:
                break
            await asyncio.sleep(0.01)
        await caps.stop()
        assert set(refreshed) == {60}
        return at_once, len(refreshed)

    at_once, later = asyncio.run(run())
    assert at_once == 1 and later >= 4


def test_a_client_that_leaves_while_its_team_slot_is_taken_sends_nothing_and_gives_the_slot_back():
    async def run() -> None:
        pool, slots, clock, caps = _setup()
        line = WaitLine(pool, admit=caps.admit)  # as rotator.proxy.assembly wires a team store
        left = False
        take = slots.take

        async def take_while_the_client_hangs_up(key: str, cap: int) -> bool:
            nonlocal left
            taken = await take(key, cap)
            left = True  # the client hung up while the team's answer was on its way
            return taken

        slots.take = take_while_the_client_hangs_up
        got = await line.acquire(NOW + 30_000, gone=lambda: left)
        assert got is ABANDONED
        assert [key for key, _, _ in slots.takes] == [KEYS[0]]  # the slot was taken …
        assert pool.in_flight == {}
        assert [a.total_requests for a in pool.accounts] == [0, 0]  # … nothing counted
        clock.advance(GIVE_DELAY_MS)
        await _settle()
        assert slots.flushes == [[KEYS[0]]]  # … and it goes back to the team
        await caps.stop()

    asyncio.run(run())
