"""Team notices: what a Redis store publishes (a person's change and a cooldown, never
a mere count), what a listener makes of a channel message (hostile ones ignored), how a
proxy acts on one, and a listener that outlives a server restart. Real redis-server for
the store's side; the proxy's side in process."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis

from rotator.admin import ops
from rotator.core import merge, throttle
from rotator.core.models import Account, AccountsFile
from rotator.pool.key_pool import KeyPool
from rotator.store import Notice, NoticeKind
from rotator.store.redis_events import parse_notice
from rotator.store.redis_store import RedisStore
from rotator.store.urls import key_id, notices_channel
from rotator.sync.save_loop import SOON_GAP_S, PoolSync
from rotator.sync.team_notices import TeamNotices
from testbed.hooks import FakeClock
from testbed.redis_server import RedisServer

KEY = "sk-kimi-" + "n" * 40
OTHER = "sk-kimi-" + "o" * 40


# -- the wire ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "notice"),
    [
        (b"state", Notice(NoticeKind.STATE)),
        (b"freed 0123456789abcdef", Notice(NoticeKind.FREED, key_id="0123456789abcdef")),
        (b"pause 10000", Notice(NoticeKind.PAUSE, pause_ms=10000)),
        (b"state now", None),
        (b"freed " + KEY.encode(), None),  # only a key id, never a key
        (b"freed 0123456789ABCDEF", None),
        (b"pause -5", None),
        (b"pause 99999999999999999999", None),
        (b"pause 1e9", None),
        ("pause 1٠".encode(), None),  # a digit that is not ASCII
        (b"\xff\xfe", None),
        (b"", None),
        (b"\x1b[2Jstate", None),
    ],
)
def test_a_channel_message_is_a_notice_or_nothing(data, notice):
    assert parse_notice(data) == notice


# -- what the store publishes ----------------------------------------------------------
def _listen(redis_server: RedisServer) -> redis.client.PubSub:
    pubsub = redis.Redis(port=redis_server.port).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(notices_channel("kimi-rotator:"))
    assert pubsub.get_message(timeout=2) is None  # the confirmation, ignored
    return pubsub


def _heard(pubsub: redis.client.PubSub) -> list[bytes]:
    heard = []
    while (message := pubsub.get_message(timeout=0.3)) is not None:
        heard.append(message["data"])
    return heard


def test_a_persons_change_and_a_cooldown_are_published_counts_are_not(redis_server):
    store = RedisStore(redis_server.url)
    pubsub = _listen(redis_server)
    ops.run(store, ops.add_key(KEY, "K", 1))
    assert _heard(pubsub) == [b"state"]

    store.load()
    counts = merge.PoolChange()
    counts.for_key(KEY).add("total_requests", 5, 1)
    counts.for_key(KEY).later("last_used", 1, 1)
    counts.move_active(KEY, 1)
    assert store.sync(counts) is not None
    assert _heard(pubsub) == []  # every proxy saves counts each second: no notice

    cooled = merge.PoolChange()
    cooled.for_key(KEY).later("rate_limit_reset_time", int(time.time() * 1000) + 60_000, 2)
    store.sync(cooled)
    assert _heard(pubsub) == [b"state"]
    disabled = merge.PoolChange()
    disabled.for_key(KEY).set("disabled_reason", "401", 3)
    store.sync(disabled)
    assert _heard(pubsub) == [b"state"]
    assert store.read().accounts[0].total_requests == 5


# -- what a proxy does with them -------------------------------------------------------
class CountingSync:
    def __init__(self) -> None:
        self.soon_calls = 0

    def soon(self) -> None:
        self.soon_calls += 1


class NoEvents:
    async def listen(self, on_notice, on_connected) -> None:
        await asyncio.Event().wait()

    async def pause(self, pause_ms: int) -> None: ...

    async def close(self) -> None: ...


class HeardCaps:
    def __init__(self) -> None:
        self.freed_ids: list[str] = []

    def freed(self, digest: str) -> None:
        self.freed_ids.append(digest)


def _pool(clock: FakeClock) -> KeyPool:
    return KeyPool(AccountsFile(accounts=[Account(key=KEY, name="K"), Account(key=OTHER, name="O")]), clock=clock)


def test_each_notice_reaches_what_it_is_for():
    clock = FakeClock()
    pool = _pool(clock)
    sync, caps = CountingSync(), HeardCaps()
    notices = TeamNotices(NoEvents(), pool, sync, caps, clock)  # type: ignore[arg-type]
    notices.heard(Notice(NoticeKind.STATE))
    assert sync.soon_calls == 1
    notices.heard(Notice(NoticeKind.FREED, key_id=key_id(KEY)))
    assert caps.freed_ids == [key_id(KEY)]
    notices.heard(Notice(NoticeKind.PAUSE, pause_ms=3_000))
    assert pool.paused_until_ms == clock.now + 3_000
    # A pause asked by anyone on the channel is bounded by the pool's own.
    notices.heard(Notice(NoticeKind.PAUSE, pause_ms=10**8))
    assert pool.paused_until_ms == clock.now + throttle.PAUSE_MS
    # And never shortens one under way.
    notices.heard(Notice(NoticeKind.PAUSE, pause_ms=1))
    assert pool.paused_until_ms == clock.now + throttle.PAUSE_MS


class CountingStore:
    location = "test store"
    what = "the test store"
    untold = None

    def __init__(self) -> None:
        self.syncs = 0

    def sync(self, changes):
        self.syncs += 1
        time.sleep(0.02)  # a save takes a while (in its worker thread)
        return None


def test_many_notices_make_few_saves():
    async def run() -> int:
        store = CountingStore()
        sync = PoolSync(store, _pool(FakeClock()), interval_s=3600)  # type: ignore[arg-type]
        for _ in range(50):
            sync.soon()
        await asyncio.sleep(0)
        for _ in range(50):  # while the first save runs: one more after it
            sync.soon()
        await sync.saved()
        return store.syncs

    assert asyncio.run(run()) == 2


def test_saves_asked_by_notices_keep_their_distance():
    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        starts: list[float] = []
        store = CountingStore()
        original = store.sync

        def timed(changes):
            starts.append(loop.time())
            return original(changes)

        store.sync = timed  # type: ignore[method-assign]
        sync = PoolSync(store, _pool(FakeClock()), interval_s=3600)  # type: ignore[arg-type]
        for _ in range(3):
            sync.soon()
            await sync.saved()
        return starts

    starts = asyncio.run(run())
    assert len(starts) == 3
    assert all(later - earlier >= SOON_GAP_S * 0.9 for earlier, later in zip(starts, starts[1:])), starts


# -- a listener on a real server --------------------------------------------------------
def test_a_listener_hears_changes_and_comes_back_after_a_restart(redis_server, caplog):
    store = RedisStore(redis_server.url)

    async def run() -> tuple[list[Notice], int]:
        heard: list[Notice] = []
        connected = asyncio.Event()
        connections = 0

        def on_connected() -> None:
            nonlocal connections
            connections += 1
            connected.set()

        events = store.team_events()
        listening = asyncio.create_task(events.listen(heard.append, on_connected))
        await asyncio.wait_for(connected.wait(), 5)
        await asyncio.to_thread(ops.run, RedisStore(redis_server.url), ops.add_key(KEY, "K", 1))
        await _until(lambda: heard == [Notice(NoticeKind.STATE)])

        connected.clear()
        await asyncio.to_thread(redis_server.stop)
        await asyncio.to_thread(redis_server.start)  # same port, empty
        await asyncio.wait_for(connected.wait(), 10)  # it says so: the proxy reads the pool
        await events.pause(2_000)
        await _until(lambda: heard[-1:] == [Notice(NoticeKind.PAUSE, pause_ms=2_000)])
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await events.close()
        return heard, connections

    with caplog.at_level(logging.WARNING):
        heard, connections = asyncio.run(run())
    assert connections == 2
    lost = [r for r in caplog.records if "notices from" in r.getMessage()]
    assert len(lost) == 1 and "redis://127.0.0.1" in lost[0].getMessage()


async def _until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.01)
