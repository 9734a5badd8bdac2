"""The README's Redis ACL user is enough for everything the proxy and the CLI do with a
team store, and no more than its key prefix: the line is read from README.md and run
against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis

from rotator.admin import ops
from rotator.core import merge
from rotator.store import Notice, NoticeKind, StoreError
from rotator.store.redis_store import RedisStore
from rotator.store.urls import key_id
from tests.support.redis_acl import PASSWORD, acl_user

pytestmark = pytest.mark.slow  # each test starts a process or a server

KEY = "sk-kimi-ACLTEST0000000000000000000000key0"
@pytest.fixture
def acl_url(redis_server):
    redis_server.command("SET", "other-app:secret", "x")
    return acl_user(redis_server)


def test_the_readme_acl_user_can_run_a_pool(acl_url):
    store = RedisStore(acl_url)
    ops.run(store, ops.add_key(KEY, "K0", 1))  # a person's change (WATCH/MULTI/EXEC, PUBLISH)
    assert [a.key for a in store.read().accounts] == [KEY]
    state = store.load()
    change = merge.PoolChange()
    change.for_key(KEY).add("total_requests", 3, 1)
    change.for_key(KEY).set("cooldown_reason", "rate limited", 1)  # decisive: it publishes
    assert store.sync(change) is not None
    assert store.read().accounts[0].total_requests == state.accounts[0].total_requests + 3

    async def team() -> list[Notice]:
        heard: list[Notice] = []
        connected = asyncio.Event()
        events = store.team_events()
        listening = asyncio.create_task(events.listen(heard.append, connected.set))
        await asyncio.wait_for(connected.wait(), 5)
        slots = store.team_slots(30_000)
        assert await slots.take(KEY, 1)  # the scripts: EVALSHA (SCRIPT LOAD first), TIME, Z*
        assert not await slots.take(KEY, 1)
        await slots.refresh()
        assert slots.give(KEY, 1)  # at its cap: to be sent at once
        await slots.flush()  # publishes "freed"
        await events.pause(1000)
        pins = store.team_pins()  # conversation affinity: GETEX and SET under the prefix
        await pins.remember("conv-1", key_id(KEY), 60_000)
        assert await pins.recall("conv-1", 60_000) == key_id(KEY)
        await pins.close()
        for _ in range(200):
            if len(heard) >= 2:
                break
            await asyncio.sleep(0.01)
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await slots.close()
        await events.close()
        return heard

    assert asyncio.run(team()) == [Notice(NoticeKind.FREED, key_id=key_id(KEY)), Notice(NoticeKind.PAUSE, pause_ms=1000)]


def test_the_readme_acl_user_sees_nothing_beyond_its_prefix(acl_url):
    client = redis.Redis.from_url(acl_url)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("other-app:secret")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.keys("*")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.publish("other-app:channel", "x")
    finally:
        client.close()
    # A pool on another prefix is refused by name, with the password masked.
    with pytest.raises(StoreError) as refused:
        RedisStore(acl_url, "other-app:").read()
    assert "permission denied" in str(refused.value)
    assert PASSWORD not in str(refused.value)


# -- a user with less than the README's line ---------------------------------------------
# Redis 7 gives a new user no channel: the README's line without `&kimi-rotator:*`.
def test_a_user_without_the_channel_gives_slots_back_all_the_same(redis_server):
    store = RedisStore(acl_user(redis_server, ("&kimi-rotator:*",)))

    async def run() -> None:
        slots = store.team_slots(30_000)
        assert await slots.take(KEY, 1)
        assert slots.give(KEY, 1)  # at its cap: the team is told, or would be
        await slots.flush()  # the "freed" notice is refused, the slot is given back
        assert await slots.take(KEY, 1)
        await slots.close()

    asyncio.run(run())
    assert redis_server.command("KEYS", "kimi-rotator:slots:*") == []


@pytest.mark.parametrize(("without", "named"), [
    (("+evalsha",), "EVALSHA"), (("+script|load",), "SCRIPT LOAD"), (("+zadd",), "ZADD"), (("+time",), "TIME"),
])
def test_the_slot_probe_names_the_command_the_user_lacks(redis_server, without, named):
    store = RedisStore(acl_user(redis_server, without))

    async def run() -> str:
        slots = store.team_slots(30_000)
        try:
            with pytest.raises(StoreError) as refused:
                await slots.ping()
            with pytest.raises(StoreError):
                await slots.take(KEY, 1)  # what the probe stands for fails too
        finally:
            await slots.close()
        return str(refused.value)

    assert f"permission denied: this user may not run {named}" in asyncio.run(run())
    assert redis_server.command("KEYS", "*") == []  # the probe changed nothing


def test_the_slot_probe_changes_nothing(acl_url, redis_server):
    async def run() -> None:
        slots = RedisStore(acl_url).team_slots(30_000)
        await slots.ping()
        await slots.close()

    asyncio.run(run())
    assert redis_server.command("KEYS", "*") == [b"other-app:secret"]


def test_a_write_the_user_may_not_make_is_named_as_a_write(redis_server):
    ops.run(RedisStore(redis_server.url), ops.add_key(KEY, "K0", 1))
    store = RedisStore(acl_user(redis_server, ("+set",)))
    store.load()
    change = merge.PoolChange()
    change.for_key(KEY).add("total_requests", 1, 1)
    with pytest.raises(StoreError) as refused:
        store.sync(change)
    assert refused.value.action == "write"
    assert "permission denied: this user may not run SET" in str(refused.value)
