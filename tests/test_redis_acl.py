"""The README's Redis ACL user is enough for everything the proxy and the CLI do with a
team store, and no more than its key prefix: the line is read from README.md and run
against a real redis-server."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import redis

from rotator import merge, ops
from rotator.store import Notice, NoticeKind, StoreError
from rotator.store.redis_store import RedisStore
from rotator.store.urls import key_id
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow  # each test starts a process or a server

README = Path(__file__).resolve().parent.parent / "README.md"
KEY = "sk-kimi-ACLTEST0000000000000000000000key0"
PASSWORD = "a-long-password"


def readme_acl_line() -> list[str]:
    found = re.search(r"^ACL SETUSER .*$", README.read_text(encoding="utf-8"), re.MULTILINE)
    assert found, "README.md shows no ACL SETUSER line"
    return found.group(0).split()


@pytest.fixture
def acl_url(tmp_path):
    (tmp_path / "redis").mkdir()
    srv = RedisServer(tmp_path / "redis")
    srv.start()
    srv.command(*readme_acl_line())
    srv.command("SET", "other-app:secret", "x")
    yield f"redis://kimi:{PASSWORD}@127.0.0.1:{srv.port}/0"
    srv.stop()


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
