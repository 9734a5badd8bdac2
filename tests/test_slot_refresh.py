"""Team slots on a real redis-server: a refresh never brings back a slot already given
back (the refresh is planned from the slots held then, and on a pooled connection it
can reach the server after a give sent on another)."""

from __future__ import annotations

import asyncio

import redis as sync_redis

from rotator.store.redis_slots import REFRESH
from rotator.store.redis_store import RedisStore
from rotator.store.urls import DEFAULT_PREFIX, slots_key
from tests.redis_server import RedisServer

KEY = "sk-kimi-" + "x" * 40


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
        late = sync_redis.Redis(port=server.port).register_script(REFRESH)
        late(keys=[slots_name], args=[30_000, 1, member])
        after_refresh = server.command("ZCARD", slots_name)
        await slots.close()
        store.close()
        return after_give, after_refresh

    try:
        assert asyncio.run(run()) == (0, 0)
    finally:
        server.stop()
