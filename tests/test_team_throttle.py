"""A throttle seen across a team: each proxy on a Redis store sees only part of a burst of
rate limits, so each tells the others of the ones it sees ("limited <key id>") and every
proxy counts them towards the throttle it detects. In process: the pool's rules (a limit
heard from elsewhere is counted, never charged; a pause refunds only this proxy's own
charges), the notice's wire form and its dispatch; and on a real redis-server, one
proxy's rate limit reaching another's listener."""

from __future__ import annotations

import asyncio

import pytest

from rotator.core import policy, throttle
from rotator.core.models import Account, AccountsFile
from rotator.core.strategies import Shortage, Unavailable
from rotator.pool.events import QUIET, PoolListener, PoolListeners
from rotator.pool.key_pool import KeyPool
from rotator.store import Notice, NoticeKind
from rotator.store.redis_events import parse_notice
from rotator.store.redis_store import RedisStore
from rotator.store.urls import key_id
from rotator.sync.team_notices import TeamNotices
from testbed.hooks import FakeClock
from testbed.pool_events import RecordedPoolEvents
from testbed.redis_server import RedisServer
from tests.support.accounts import NOW, fake_keys

KEYS = fake_keys(4)
LIMITED = policy.classify(429, {"retry-after": "30"}, b"", NOW)


def _pool(clock: FakeClock | None = None, listener: PoolListener = QUIET) -> KeyPool:
    accounts = [Account(key=key, name=f"K{i}") for i, key in enumerate(KEYS)]
    pool = KeyPool(
        AccountsFile(accounts=accounts, rotation_strategy="round-robin"), clock=clock or FakeClock(NOW),
        listener=listener,
    )
    return pool


def _states(pool: KeyPool) -> list[tuple[int, int, int]]:
    return [(a.rate_limit_reset_time, a.cooldown_level, a.health_score) for a in pool.accounts]


@pytest.mark.parametrize(
    ("data", "notice"),
    [
        (b"limited 0123456789abcdef", Notice(NoticeKind.LIMITED, key_id="0123456789abcdef")),
        (b"limited " + KEYS[0].encode(), None),  # a key id, never a key
        (b"limited 0123456789abcde", None),
        (b"limited", None),
        (b"limited 0123456789abcdef extra", None),
    ],
)
def test_a_rate_limit_notice_names_a_key_id_or_is_nothing(data, notice):
    assert parse_notice(data) == notice


def test_a_rate_limit_seen_here_is_told_and_charged():
    heard = RecordedPoolEvents()
    pool = _pool(listener=heard)
    lease = pool.acquire(NOW)
    pool.release(lease, LIMITED, NOW)
    assert heard.named("limited") == [(KEYS[0],)]
    assert pool.accounts[0].rate_limit_reset_time > NOW  # charged to the key, as alone


def test_limits_heard_from_the_team_complete_a_throttle_here_and_only_our_charge_is_refunded():
    heard = RecordedPoolEvents()
    pool = _pool(listener=heard)
    lease = pool.acquire(NOW)  # key 0
    pool.release(lease, LIMITED, NOW)
    charged = pool.accounts[0].rate_limit_reset_time
    assert charged > NOW
    # Two other proxies saw keys 1 and 2 refused: counted, not charged here.
    assert pool.heard_limit(KEYS[1], NOW + 500) is None
    assert _states(pool)[1:] == [(0, 0, 100)] * 3
    line = pool.heard_limit(KEYS[2], NOW + 1000)
    assert line is not None and "3 keys rate limited within 5 s" in line
    assert heard.named("paused") == [(throttle.PAUSE_MS,)]  # and the team is told to pause
    assert pool.paused_until_ms == NOW + 1000 + throttle.PAUSE_MS
    # Key 0's cooldown was the throttle's, not the key's: refunded; nothing else changed.
    assert _states(pool) == [(0, 0, 100)] * 4
    assert pool.acquire(NOW + 1000) == Unavailable(Shortage.THROTTLED, NOW + 1000 + throttle.PAUSE_MS)


def test_the_same_key_heard_many_times_is_no_throttle():
    pool = _pool()
    for i in range(10):  # one key refused at every proxy, our own echo included
        assert pool.heard_limit(KEYS[1], NOW + i) is None
    assert pool.paused_until_ms == 0


def test_limits_outside_the_window_or_during_a_pause_count_for_nothing():
    pool = _pool()
    assert pool.heard_limit(KEYS[0], NOW) is None
    assert pool.heard_limit(KEYS[1], NOW + throttle.THROTTLE_WINDOW_MS + 1) is None
    assert pool.heard_limit(KEYS[2], NOW + throttle.THROTTLE_WINDOW_MS + 2) is None  # key 0 is too old
    assert pool.paused_until_ms == 0
    assert pool.heard_limit("sk-kimi-" + "z" * 40, NOW) is None  # not in this pool: ignored
    pool.pause_for(throttle.PAUSE_MS, NOW + 10)
    assert pool.heard_limit(KEYS[3], NOW + 20) is None


def test_a_pause_from_the_team_refunds_our_charges_in_its_window():
    pool = _pool()
    old = pool.acquire(NOW)  # key 0, limited long before: stays charged
    pool.release(old, LIMITED, NOW)
    recent = pool.acquire(NOW + 10_000)  # key 1, limited just before the pause
    pool.release(recent, LIMITED, NOW + 10_000)
    assert pool.accounts[1].rate_limit_reset_time > NOW + 10_000
    pool.pause_for(throttle.PAUSE_MS, NOW + 11_000)
    assert pool.accounts[1].rate_limit_reset_time == 0
    assert pool.accounts[1].health_score == 100
    assert pool.accounts[0].rate_limit_reset_time > NOW  # outside the window: its own


class QuietEvents:
    """TeamEvents that tell nobody, recording what they were asked to tell."""

    def __init__(self) -> None:
        self.told: list[str] = []

    async def pause(self, pause_ms: int) -> None:
        self.told.append(f"pause {pause_ms}")

    async def limited(self, digest: str) -> None:
        self.told.append(f"limited {digest}")


class NoSync:
    def soon(self) -> None:
        pass


def test_notices_wire_the_pool_to_the_team(caplog):
    async def run() -> tuple[list[str], KeyPool]:
        clock = FakeClock(NOW)
        listeners = PoolListeners()
        pool = _pool(clock, listeners)
        events = QuietEvents()
        notices = TeamNotices(events, pool, NoSync(), None, clock)  # type: ignore[arg-type]
        listeners.add(notices)  # as rotator.proxy.assembly wires a team store
        pool.release(pool.acquire(NOW), LIMITED, NOW)  # key 0, here: told
        notices.heard(Notice(NoticeKind.LIMITED, key_id="f" * 16))  # no such key: ignored
        notices.heard(Notice(NoticeKind.LIMITED, key_id=key_id(KEYS[1])))
        with caplog.at_level("INFO"):
            notices.heard(Notice(NoticeKind.LIMITED, key_id=key_id(KEYS[2])))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return events.told, pool

    told, pool = asyncio.run(run())
    assert told == [f"limited {key_id(KEYS[0])}", f"pause {throttle.PAUSE_MS}"]
    assert pool.paused_until_ms == NOW + throttle.PAUSE_MS
    assert "rate limits seen across the team" in caplog.text
    assert KEYS[0] not in caplog.text


def test_notices_that_stopped_tell_the_team_nothing_of_what_the_pool_says():
    class ClosingEvents(QuietEvents):
        async def close(self) -> None:
            pass

    class CountingSync(NoSync):
        calls = 0

        def soon(self) -> None:
            self.calls += 1

    async def run() -> tuple[list[str], int]:
        listeners = PoolListeners()
        pool = _pool(FakeClock(NOW), listeners)
        events, sync = ClosingEvents(), CountingSync()
        notices = TeamNotices(events, pool, sync, None, FakeClock(NOW))  # type: ignore[arg-type]
        listeners.add(notices)
        await notices.stop()
        for key in KEYS[:3]:  # three rate limits in a row: a throttle, and three changes
            lease = pool.acquire(NOW)
            assert lease.key == key  # type: ignore[union-attr]
            pool.release(lease, LIMITED, NOW)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        return events.told, sync.calls

    told, saves = asyncio.run(run())
    assert told == [] and saves == 0


@pytest.mark.slow
def test_a_rate_limit_reaches_another_proxys_listener(tmp_path):
    server = RedisServer(tmp_path)
    server.start()

    async def run() -> list[Notice]:
        store = RedisStore(server.url)
        heard: list[Notice] = []
        connected = asyncio.Event()
        listener = store.team_events()
        listening = asyncio.create_task(listener.listen(heard.append, connected.set))
        await asyncio.wait_for(connected.wait(), 5)
        teller = store.team_events()
        await teller.limited(key_id(KEYS[3]))
        for _ in range(200):
            if heard:
                break
            await asyncio.sleep(0.01)
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await listener.close()
        await teller.close()
        store.close()
        return heard

    try:
        assert asyncio.run(run()) == [Notice(NoticeKind.LIMITED, key_id=key_id(KEYS[3]))]
    finally:
        server.stop()
