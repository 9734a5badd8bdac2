"""Team-wide caps in process (`TeamCaps`): an admitted attempt takes a slot at the key's
team cap and gives it back when it ends (sent at once if this proxy filled the cap, else
after GIVE_DELAY_MS, several in one flush); a refused one is abandoned and its key
skipped until HOLD_MS passes or a freed notice comes; a store that does not answer lets
requests go on (logged once, nothing given back for them) until the reconnect loop
brings the caps back; stop() cancels the planned flush and closes the slots. A fake
TeamSlots, a FakeClock and a real KeyPool."""

from __future__ import annotations

import asyncio
import logging
import time

from rotator.core import policy
from rotator.core.log import ALERT
from rotator.core.models import Account, AccountsFile
from rotator.core.strategies import Unavailable
from rotator.pool.events import PoolListeners
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.store import StoreError
from rotator.store.urls import key_id
from rotator.sync import team_caps
from rotator.sync.team_caps import GIVE_DELAY_MS, HOLD_MS, TeamCaps
from testbed.hooks import FakeClock
from tests.support.accounts import KEYS

MAX_IN_FLIGHT = 4
OK = policy.classify(200, {}, b"{}", 0)


class FakeSlots:
    """A TeamSlots that records its calls: refuses keys in `full`, raises `down` if set;
    gives queue until a take or a flush that answers carries them."""

    def __init__(self, ttl_ms: int = 30_000) -> None:
        self.ttl_ms = ttl_ms
        self.calls: list[tuple[object, ...]] = []
        self.full: set[str] = set()
        self.down: StoreError | None = None
        self.fills_cap = False  # what give answers: this proxy's take filled the cap
        self.queued: list[str] = []

    @property
    def unsent(self) -> int:
        return len(self.queued)

    def named(self, name: str) -> list[tuple[object, ...]]:
        return [call for call in self.calls if call[0] == name]

    def _answer(self) -> None:
        if self.down is not None:
            raise self.down

    async def take(self, key: str, cap: int) -> bool:
        self.calls.append(("take", key, cap))
        self._answer()
        self.queued = []
        return key not in self.full

    def give(self, key: str, cap: int) -> bool:
        self.calls.append(("give", key, cap))
        self.queued.append(key)
        return self.fills_cap

    async def flush(self) -> None:
        self.calls.append(("flush",))
        self._answer()
        self.queued = []

    async def refresh(self) -> None:
        self.calls.append(("refresh",))
        self._answer()

    async def ping(self) -> None:
        self.calls.append(("ping",))
        self._answer()

    async def close(self) -> None:
        self.calls.append(("close",))


def team(strategy: str = "sticky", ttl_ms: int = 30_000) -> tuple[KeyPool, FakeSlots, TeamCaps, FakeClock]:
    clock = FakeClock()
    accounts = [Account(key=key, name=f"k{i}") for i, key in enumerate(KEYS)]
    listeners = PoolListeners()
    pool = KeyPool(AccountsFile(accounts=accounts, rotation_strategy=strategy), MAX_IN_FLIGHT, clock, listeners)
    slots = FakeSlots(ttl_ms)
    caps = TeamCaps(pool, slots, clock)
    listeners.add(caps)  # as rotator.proxy.assembly wires a team store
    return pool, slots, caps, clock


def acquire(pool: KeyPool, clock: FakeClock) -> Lease:
    lease = pool.acquire(clock.now_ms())
    assert isinstance(lease, Lease), lease
    return lease


def release(pool: KeyPool, lease: Lease, clock: FakeClock) -> None:
    pool.release(lease, OK, clock.now_ms())


async def settle() -> None:
    for _ in range(10):  # let the tasks TeamCaps started run
        await asyncio.sleep(0)


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.005)


async def test_an_admitted_attempt_takes_a_slot_at_the_team_cap_and_gives_it_back_later():
    pool, slots, caps, clock = team()
    lease = acquire(pool, clock)
    assert await caps.admit(lease)
    assert slots.calls == [("take", KEYS[0], MAX_IN_FLIGHT)]
    assert pool.in_flight == {KEYS[0]: 1}
    pool.accounts[1].cooldown_level = 1  # half-open: one request team-wide
    probe = pool.acquire(clock.now_ms(), tried={KEYS[0]})
    assert isinstance(probe, Lease) and probe.key == KEYS[1]
    assert await caps.admit(probe)
    assert slots.calls[-1] == ("take", KEYS[1], 1)
    release(pool, lease, clock)
    assert slots.calls[-1] == ("give", KEYS[0], MAX_IN_FLIGHT)
    await settle()
    clock.advance(GIVE_DELAY_MS - 1)
    await settle()
    assert slots.named("flush") == []  # the next take may carry it yet
    clock.advance(1)
    await settle()
    assert slots.named("flush") == [("flush",)]
    clock.advance(10 * GIVE_DELAY_MS)
    await settle()
    assert len(slots.named("flush")) == 1


async def test_a_slot_whose_take_filled_the_cap_goes_back_at_once():
    pool, slots, caps, clock = team()
    first, second = acquire(pool, clock), acquire(pool, clock)
    assert await caps.admit(first) and await caps.admit(second)
    release(pool, first, clock)  # a flush planned in GIVE_DELAY_MS
    assert clock.pending_timers == 1
    slots.fills_cap = True
    release(pool, second, clock)
    await settle()  # no time passed
    assert slots.named("flush") == [("flush",)]
    assert clock.pending_timers == 0  # the planned one went with it
    clock.advance(10 * GIVE_DELAY_MS)
    await settle()
    assert len(slots.named("flush")) == 1


async def test_slots_given_back_within_the_delay_go_in_one_flush():
    pool, slots, caps, clock = team("round-robin")
    leases = [acquire(pool, clock) for _ in range(4)]
    for lease in leases:
        assert await caps.admit(lease)
    for lease in leases[:3]:
        release(pool, lease, clock)
        clock.advance(GIVE_DELAY_MS // 4)
        await settle()
    assert len(slots.named("give")) == 3 and slots.named("flush") == []
    clock.advance(GIVE_DELAY_MS)
    await settle()
    assert len(slots.named("flush")) == 1
    release(pool, leases[3], clock)  # a later one: a flush of its own
    clock.advance(GIVE_DELAY_MS)
    await settle()
    assert len(slots.named("flush")) == 2


async def test_a_refused_attempt_is_abandoned_and_its_key_skipped_until_the_hold_ends():
    pool, slots, caps, clock = team()
    held = acquire(pool, clock)
    assert await caps.admit(held)  # this proxy holds one of its slots …
    slots.full.add(KEYS[0])  # … and other proxies the rest
    lease = acquire(pool, clock)
    assert lease.key == KEYS[0]
    assert not await caps.admit(lease)
    assert pool.in_flight == {KEYS[0]: 1}  # handed back …
    assert pool.accounts[0].total_requests == 1  # … uncounted
    assert slots.named("give") == []  # it held no slot; the other request keeps its own
    clock.advance(HOLD_MS - 1)
    for _ in range(3):  # the team holds it at its cap: another key serves meanwhile
        other = acquire(pool, clock)
        assert other.key == KEYS[1]
        release(pool, other, clock)
    assert isinstance(pool.acquire(clock.now_ms(), tried=KEYS[1:]), Unavailable)  # only it is left
    clock.advance(1)
    back = pool.acquire(clock.now_ms(), tried=KEYS[1:])
    assert isinstance(back, Lease) and back.key == KEYS[0]
    release(pool, held, clock)
    assert slots.named("give") == [("give", KEYS[0], MAX_IN_FLIGHT)]


async def test_a_freed_notice_ends_the_hold_at_once():
    pool, slots, caps, clock = team()
    slots.full.add(KEYS[0])
    assert not await caps.admit(acquire(pool, clock))
    caps.freed(key_id(KEYS[2]))  # another key freed: this one stays held
    caps.freed("0123456789abcdef")  # no key of this pool: nothing
    skipped = acquire(pool, clock)
    assert skipped.key == KEYS[1]
    release(pool, skipped, clock)
    assert isinstance(pool.acquire(clock.now_ms(), tried=KEYS[1:]), Unavailable)
    caps.freed(key_id(KEYS[0]))  # long before HOLD_MS
    slots.full.clear()
    lease = pool.acquire(clock.now_ms(), tried=KEYS[1:])
    assert isinstance(lease, Lease) and lease.key == KEYS[0]
    assert await caps.admit(lease)
    assert slots.calls[-1] == ("take", KEYS[0], MAX_IN_FLIGHT)


async def test_a_store_that_does_not_answer_lets_requests_go_until_it_does(monkeypatch, caplog):
    monkeypatch.setattr(team_caps, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(team_caps, "RETRY_MOST_S", 0.02)
    caplog.set_level(logging.INFO, logger=team_caps.__name__)
    pool, slots, caps, clock = team()
    before = acquire(pool, clock)
    assert await caps.admit(before)  # holds a slot
    slots.down = StoreError("redis://127.0.0.1:1/0: unreachable")
    away = [pool.acquire(clock.now_ms(), tried={before.key}) for _ in range(3)]
    for lease in away:
        assert await caps.admit(lease)  # goes on under this process's caps
    assert len(slots.named("take")) == 2  # asked once more, not again while away
    assert caps.away is not None and "unreachable" in caps.away
    paused = [r for r in caplog.records if "paused" in r.getMessage()]
    assert len(paused) == 1 and paused[0].levelno == logging.WARNING
    assert "unreachable" in paused[0].getMessage()
    assert {lease.key for lease in away} == {KEYS[1]}
    release(pool, away[0], clock)  # held no slot: nothing to give back
    assert slots.named("give") == []
    slots.fills_cap = True
    release(pool, before, clock)  # its slot is given back; the flush fails too
    await settle()
    assert slots.named("give") == [("give", KEYS[0], MAX_IN_FLIGHT)]
    assert slots.named("flush") == [("flush",)]
    await until(lambda: len(slots.named("refresh")) >= 3)  # retried, still away
    assert caps.away is not None
    assert len([r for r in caplog.records if "paused" in r.getMessage()]) == 1  # logged once
    slots.down = None
    await until(lambda: caps.away is None)
    again = [r for r in caplog.records if "hold again" in r.getMessage()]
    assert len(again) == 1 and again[0].levelno == ALERT
    assert slots.calls[-2:] == [("refresh",), ("ping",)]
    for lease in away[1:]:  # admitted while away, ending after the store is back
        release(pool, lease, clock)
    clock.advance(10 * GIVE_DELAY_MS)
    await settle()
    assert len(slots.named("give")) == 1 and len(slots.named("flush")) == 1
    slotted = acquire(pool, clock)
    assert await caps.admit(slotted)
    assert len(slots.named("take")) == 3  # caps hold again
    release(pool, slotted, clock)
    assert slots.named("give")[1:] == [("give", KEYS[1], MAX_IN_FLIGHT)]
    await caps.stop()


async def test_a_flush_that_fails_pauses_the_caps_too(monkeypatch, caplog):
    monkeypatch.setattr(team_caps, "RETRY_FIRST_S", 3600)  # no reconnect within the test
    pool, slots, caps, clock = team()
    lease = acquire(pool, clock)
    assert await caps.admit(lease)
    slots.down = StoreError("redis://127.0.0.1:1/0: no answer within 1 s")
    slots.fills_cap = True
    with caplog.at_level(logging.WARNING, logger=team_caps.__name__):
        release(pool, lease, clock)
        await settle()
    assert slots.named("flush") == [("flush",)]
    assert caps.away is not None and "no answer" in caps.away
    assert len([r for r in caplog.records if "paused" in r.getMessage()]) == 1
    assert await caps.admit(acquire(pool, clock))
    assert len(slots.named("take")) == 1  # away: not asked
    await caps.stop()


async def test_stop_cancels_the_planned_flush_and_closes_the_slots():
    pool, slots, caps, clock = team(ttl_ms=30)  # refreshed every 10 ms
    caps.start()
    ended, later = acquire(pool, clock), acquire(pool, clock)
    assert await caps.admit(ended) and await caps.admit(later)
    await until(lambda: len(slots.named("refresh")) >= 2)
    release(pool, ended, clock)
    assert clock.pending_timers == 1  # the flush, planned
    await caps.stop()
    assert slots.calls[-1] == ("close",)
    assert clock.pending_timers == 0
    refreshes = len(slots.named("refresh"))
    calls = len(slots.calls)
    clock.advance(10 * GIVE_DELAY_MS)
    await asyncio.sleep(0.05)  # five refresh intervals
    assert len(slots.named("refresh")) == refreshes
    assert slots.named("flush") == []  # close gives back what is left, not a flush
    release(pool, later, clock)  # a request ending after stop: nothing queued
    await settle()
    assert len(slots.calls) == calls
    assert pool.in_flight == {}
