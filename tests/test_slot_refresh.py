"""Team slots' lifetimes on a real redis-server: a refresh never brings back a slot
already given back (the refresh is planned from the slots held then, and on a pooled
connection it can reach the server after a give sent on another); a proxy with a short
kimi_slot_ttl does not shorten the others' slots; closing tells the team of a freed
slot only where the key was at its cap."""

from __future__ import annotations

import asyncio

import pytest
import redis as sync_redis

from rotator.store.redis_slots import REFRESH
from rotator.store.redis_store import RedisStore
from rotator.store.urls import DEFAULT_PREFIX, NOTICE_FREED, key_id, notices_channel, slots_key
from testbed.redis_server import RedisServer

pytestmark = pytest.mark.slow  # each test starts a process or a server

KEY = "sk-kimi-" + "x" * 40
OTHER = "sk-kimi-" + "y" * 40


def test_a_refresh_run_after_a_give_does_not_bring_the_slot_back(tmp_path):
    """A refresh is planned from the slots held then, and may reach the server after a
    give sent on another pooled connection: it must not put the given slot back (it
    would stay held, for the whole team, until its TTL)."""
    server = RedisServer(tmp_path)
    server.start()
    slots_name = slots_key(DEFAULT_PREFIX, KEY)

    async def run() -> tuple[int, int]:
        store = RedisStore(server.url)
        slots = store.team_slots(30_000)
        assert await slots.take(KEY, 5)
        [member] = server.command("ZRANGE", slots_name, "0", "-1")
        slots.give(KEY, 5)
        await slots.flush()
        after_give = server.command("ZCARD", slots_name)
        # The refresh planned before that give, arriving now.
        late = sync_redis.Redis(port=server.port).register_script(REFRESH.source)
        late(keys=[slots_name], args=[30_000, 1, member])
        after_refresh = server.command("ZCARD", slots_name)
        await slots.close()
        store.close()
        return after_give, after_refresh

    try:
        assert asyncio.run(run()) == (0, 0)
    finally:
        server.stop()


def test_a_proxy_with_a_short_slot_lifetime_does_not_cut_off_anothers_slots(tmp_path):
    """kimi_slot_ttl is each proxy's own: a set of slots lives as long as its longest."""
    server = RedisServer(tmp_path)
    server.start()
    slots_name = slots_key(DEFAULT_PREFIX, KEY)

    async def run() -> int:
        store = RedisStore(server.url)
        long, short = store.team_slots(30_000), store.team_slots(300)
        assert await long.take(KEY, 5)
        assert await short.take(KEY, 5)  # would set the set's expiry to 300 ms
        await short.refresh()
        left = int(server.command("PTTL", slots_name))
        await short.close()
        await long.close()
        store.close()
        return left

    try:
        assert asyncio.run(run()) > 20_000
    finally:
        server.stop()


def test_close_tells_the_team_of_a_freed_slot_only_at_the_cap(tmp_path):
    server = RedisServer(tmp_path)
    server.start()

    async def run() -> list[bytes]:
        pubsub = sync_redis.Redis(port=server.port).pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(notices_channel(DEFAULT_PREFIX))
        assert pubsub.get_message(timeout=2) is None
        store = RedisStore(server.url)
        below, full = store.team_slots(30_000), store.team_slots(30_000)
        assert await below.take(KEY, 5)  # 1 of 5
        await below.close()
        assert await full.take(OTHER, 1)  # 1 of 1: someone may wait for it
        await full.close()
        heard = []
        while (message := pubsub.get_message(timeout=0.3)) is not None:
            heard.append(message["data"])
        store.close()
        return heard

    try:
        assert asyncio.run(run()) == [f"{NOTICE_FREED} {key_id(OTHER)}".encode()]
    finally:
        server.stop()
