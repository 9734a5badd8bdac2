"""Team-wide in-flight slots (`RedisSlots`) on a real redis-server: the cap holds across
proxies, a slot given back rides with the next take (one script) and tells the team
only when the key was at its cap, slots of a proxy that stops refreshing expire while
refreshed ones live on, prefixes keep pools apart, no key shows in Redis, a server that
is gone fails fast and loses no slot given back (nor one taken without an answer), and
close gives back every slot still held."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import redis

from rotator.store import StoreError
from rotator.store.redis_slots import RedisSlots
from rotator.store.redis_store import RedisStore
from rotator.store.urls import DEFAULT_PREFIX, NOTICE_FREED, key_id, notices_channel, slots_key

KEY = "sk-kimi-" + "s" * 40
OTHER = "sk-kimi-" + "t" * 40
LONG_TTL_MS = 30_000


@pytest.fixture
def client(redis_server):
    c = redis.Redis(port=redis_server.port)
    yield c
    c.close()


def members(client: redis.Redis, key: str, prefix: str = DEFAULT_PREFIX) -> set[str]:
    return {m.decode() for m in client.zrange(slots_key(prefix, key), 0, -1)}


def listen(client: redis.Redis, *channels: str) -> redis.client.PubSub:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(*channels)
    for _ in channels:
        assert pubsub.get_message(timeout=2) is None  # the confirmations, ignored
    return pubsub


def heard(pubsub: redis.client.PubSub) -> list[tuple[str, str]]:
    got = []
    while (message := pubsub.get_message(timeout=0.3)) is not None:
        got.append((message["channel"].decode(), message["data"].decode()))
    return got


def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.01)


async def test_the_cap_holds_for_every_proxy_on_the_store(redis_server, client):
    store = RedisStore(redis_server.url)
    a = RedisSlots(store, LONG_TTL_MS, holder="a")
    b = RedisSlots(store, LONG_TTL_MS, holder="b")
    assert await a.take(KEY, 2)
    assert await b.take(KEY, 2)
    assert not await a.take(KEY, 2)  # the team holds the key at its cap
    assert not await b.take(KEY, 2)
    assert members(client, KEY) == {"a:1", "b:1"}  # a refused take adds nothing
    assert (a.held, b.held) == (1, 1)
    assert await a.take(OTHER, 2)  # another key has slots of its own
    assert b.give(KEY, 2)  # b's take filled the cap
    await b.flush()
    assert members(client, KEY) == {"a:1"}
    assert await a.take(KEY, 2)
    assert not await b.take(KEY, 2)
    await a.close()
    await b.close()


async def test_a_slot_given_back_rides_with_the_next_take(redis_server, client):
    store = RedisStore(redis_server.url)
    a = RedisSlots(store, LONG_TTL_MS, holder="a")
    b = RedisSlots(store, LONG_TTL_MS, holder="b")
    assert await a.take(KEY, 2)  # 1 held: did not fill the cap
    assert await b.take(KEY, 2)  # 2 held: filled it
    assert not a.give(OTHER, 2)  # nothing held there: nothing to give
    assert not a.give(KEY, 2)
    assert b.give(KEY, 2)
    # Given, not sent yet: the team still counts them, and so does `held`.
    assert client.zcard(slots_key(DEFAULT_PREFIX, KEY)) == 2
    assert (a.held, b.held) == (1, 1)
    client.config_resetstat()
    assert await a.take(OTHER, 2)
    stats = client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1  # one script: the give went with the take
    assert "cmdstat_eval" not in stats and "cmdstat_script|load" not in stats
    assert members(client, KEY) == {"b:1"}
    assert members(client, OTHER) == {"a:2"}
    assert (a.held, b.held) == (1, 1)
    await b.flush()
    assert client.exists(slots_key(DEFAULT_PREFIX, KEY)) == 0
    assert b.held == 0
    await a.close()
    await b.close()


async def test_freed_is_published_only_when_the_key_was_at_its_cap(redis_server, client):
    store = RedisStore(redis_server.url)
    channel = notices_channel(DEFAULT_PREFIX)
    pubsub = listen(client, channel)
    a = RedisSlots(store, LONG_TTL_MS, holder="a")
    b = RedisSlots(store, LONG_TTL_MS, holder="b")
    assert await a.take(KEY, 3)
    assert await b.take(KEY, 3)
    assert not a.give(KEY, 3)
    await a.flush()  # 2 of 3 held when it went: nobody can be waiting
    assert heard(pubsub) == []
    assert await a.take(KEY, 3)
    assert await b.take(KEY, 3)  # 3 of 3: b filled the cap
    assert not a.give(KEY, 3)  # not this proxy's take that filled it …
    await a.flush()  # … but the key was at its cap when it went: the team hears
    assert heard(pubsub) == [(channel, f"{NOTICE_FREED} {key_id(KEY)}")]
    assert b.give(KEY, 3)  # b's take filled the cap, but the key is at 2 of 3 by now
    await b.flush()
    assert heard(pubsub) == []
    assert client.zcard(slots_key(DEFAULT_PREFIX, KEY)) == 1
    pubsub.close()
    await a.close()
    await b.close()


async def test_a_slot_not_refreshed_expires_and_a_refreshed_one_lives_on(redis_server, client):
    store = RedisStore(redis_server.url)
    ttl_ms = 300
    gone = RedisSlots(store, ttl_ms, holder="gone")  # a proxy that stops refreshing
    alive = RedisSlots(store, ttl_ms, holder="alive")
    slots = slots_key(DEFAULT_PREFIX, KEY)
    assert await gone.take(KEY, 2)
    assert await alive.take(KEY, 2)
    assert await gone.take(OTHER, 2)  # a key only the proxy that stops refreshing uses
    gone_expiry = client.zscore(slots, "gone:1")
    first_expiry = client.zscore(slots, "alive:1")
    assert gone_expiry is not None and first_expiry is not None

    async def refresh_forever() -> None:
        while True:
            await alive.refresh()
            await asyncio.sleep(0.03)

    refreshing = asyncio.create_task(refresh_forever())
    try:
        await until(lambda: server_ms(client) > gone_expiry + 50)  # server time: past its ttl
        assert client.zcard(slots) == 2  # expired, but nothing has dropped it yet
        assert client.exists(slots_key(DEFAULT_PREFIX, OTHER)) == 0  # a key nobody uses leaves nothing
        refreshed = client.zscore(slots, "alive:1")
        assert refreshed is not None and refreshed > first_expiry + 50
        assert refreshed > server_ms(client)  # still alive past its first ttl
        assert await alive.take(KEY, 2)  # the next take drops it: the cap has room
        assert members(client, KEY) == {"alive:1", "alive:2"}
        await gone.refresh()  # too late: a slot that expired does not come back
        assert client.zscore(slots, "gone:1") is None
    finally:
        refreshing.cancel()
        await asyncio.gather(refreshing, return_exceptions=True)
    # Nobody refreshes any more: the set goes with its newest slot.
    await until(lambda: client.exists(slots) == 0)
    await gone.close()
    await alive.close()


async def test_pools_on_other_prefixes_share_no_slots(redis_server, client):
    one = RedisSlots(RedisStore(redis_server.url, "team-one:"), LONG_TTL_MS, holder="one")
    two = RedisSlots(RedisStore(redis_server.url, "team-two:"), LONG_TTL_MS, holder="two")
    pubsub = listen(client, notices_channel("team-one:"), notices_channel("team-two:"))
    assert await one.take(KEY, 1)
    assert await two.take(KEY, 1)  # the same key, another pool: its own cap
    assert not await one.take(KEY, 1)
    assert members(client, KEY, "team-one:") == {"one:1"}
    assert members(client, KEY, "team-two:") == {"two:1"}
    assert one.give(KEY, 1)
    await one.flush()
    assert heard(pubsub) == [("team-one:notices", f"{NOTICE_FREED} {key_id(KEY)}")]
    assert members(client, KEY, "team-two:") == {"two:1"}
    assert not await two.take(KEY, 1)
    pubsub.close()
    await one.close()
    await two.close()


async def test_no_key_shows_in_any_redis_name_or_member(redis_server, client):
    store = RedisStore(redis_server.url)
    pubsub = listen(client, notices_channel(DEFAULT_PREFIX))
    a = RedisSlots(store, LONG_TTL_MS)  # the real holder name: host and process
    b = RedisSlots(store, LONG_TTL_MS, holder="b")
    for key in (KEY, OTHER):
        assert await a.take(key, 2)
        assert await b.take(key, 2)
        assert not await a.take(key, 2)
    a.give(KEY, 2)
    await a.refresh()
    await a.flush()
    names = {name.decode() for name in client.scan_iter("*")}
    assert names == {slots_key(DEFAULT_PREFIX, KEY), slots_key(DEFAULT_PREFIX, OTHER)}
    seen = list(names) + [data for _, data in heard(pubsub)]
    for name in names:
        seen += [m.decode() for m in client.zrange(name, 0, -1)]
    assert len(seen) == 2 + 1 + 3  # two sets, one notice, three slots still held
    for text in seen:
        assert "sk-kimi-" not in text and KEY not in text and OTHER not in text, text
    pubsub.close()
    await a.close()
    await b.close()


async def test_a_server_that_is_gone_fails_fast_and_loses_no_slot_given_back(redis_server, client):
    store = RedisStore(redis_server.url)
    a = RedisSlots(store, LONG_TTL_MS, holder="a")
    slots = slots_key(DEFAULT_PREFIX, KEY)
    assert await a.take(KEY, 3)
    assert await a.take(KEY, 3)
    assert not a.give(KEY, 3)  # queued, still counted on the server
    redis_server.stop(keep_data=True)
    for call in (lambda: a.take(OTHER, 3), a.flush, a.ping):
        started = time.monotonic()
        with pytest.raises(StoreError):
            await call()
        assert time.monotonic() - started < 1.5
    assert a.held == 3  # one held, the one given back, the take that got no answer
    redis_server.start()  # same port, same data
    assert members(client, KEY) == {"a:1", "a:2"}
    await a.flush()
    assert members(client, KEY) == {"a:1"}  # the give queued before the outage went
    assert a.held == 1
    assert a.give(KEY, 1)
    await a.flush()
    assert client.exists(slots) == 0
    await a.close()


BUSY = """
local s = redis.call('TIME')
while true do
  local t = redis.call('TIME')
  if (t[1] - s[1]) * 1000000 + (t[2] - s[2]) > tonumber(ARGV[1]) then return 1 end
end
"""


def answers_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        s.settimeout(0.05)
        try:
            return s.recv(16).startswith(b"+PONG")
        except TimeoutError:
            return False


async def test_a_take_that_got_no_answer_is_given_back_with_the_next_call(redis_server, client):
    store = RedisStore(redis_server.url)
    a = RedisSlots(store, LONG_TTL_MS, holder="a")
    assert await a.take(KEY, 2)  # the scripts are loaded: the take below is one EVALSHA
    assert a.give(KEY, 1)
    await a.flush()
    # Another client keeps the server busy longer than the client waits for an answer:
    # the take times out here, and the server runs it when the busy script ends.
    busy = asyncio.create_task(asyncio.to_thread(redis_server.command, "EVAL", BUSY, "0", "2000000"))
    await until(lambda: not answers_ping(redis_server.port))
    with pytest.raises(StoreError):
        await a.take(KEY, 2)
    await busy
    assert members(client, KEY) == {"a:2"}  # the server took it all the same
    assert a.held == 1  # counted as given back, not held
    assert await a.take(OTHER, 2)
    assert client.exists(slots_key(DEFAULT_PREFIX, KEY)) == 0  # gone with the next call
    await a.close()


async def test_close_gives_back_every_slot_still_held(redis_server, client):
    store = RedisStore(redis_server.url)
    a = RedisSlots(store, LONG_TTL_MS, holder="a")
    b = RedisSlots(store, LONG_TTL_MS, holder="b")
    for _ in range(3):
        assert await a.take(KEY, 5)
    assert await a.take(OTHER, 5)
    assert await b.take(KEY, 5)
    a.give(KEY, 5)  # queued, never sent before close
    await a.close()
    assert members(client, KEY) == {"b:1"}  # only the other proxy's slot is left
    assert client.exists(slots_key(DEFAULT_PREFIX, OTHER)) == 0
    assert a.held == 0
    await b.close()
    assert client.dbsize() == 0
