"""The save loop (`PoolSync`) on a real redis-server: a pool the server lost comes back
from the proxies' memory with every count, said once; a user who may not publish still
saves, and is told so once; what a last save could not keep is said, with how many."""

from __future__ import annotations

import logging

import pytest

from rotator.admin import ops
from rotator.core import policy
from rotator.core.clock import now_ms
from rotator.core.log import ALERT
from rotator.core.models import AccountsFile
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.store.redis_store import RedisStore
from rotator.sync.save_loop import PoolSync
from testbed.redis_server import RedisServer
from tests.support.accounts import KEYS
from tests.support.redis_acl import PASSWORD, acl_user

RATE_LIMITED = (429, b'{"error":{"message":"rate limited"}}', {"retry-after": "600"})


def answer(pool: KeyPool, status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None) -> str:
    """One request on the pool's next key, answered `status`; its key."""
    now = now_ms()
    lease = pool.acquire(now)
    assert isinstance(lease, Lease)
    pool.release(lease, policy.classify(status, headers or {}, body, now), now)
    return lease.key


def proxy(url: str) -> PoolSync:
    sync = PoolSync(RedisStore(url), KeyPool(AccountsFile()), 1.0)
    assert sync.load() is not None
    return sync


def stored_counts(url: str) -> dict[str, int]:
    return {a.key: a.total_requests for a in RedisStore(url).read().accounts}


def add_keys(url: str, keys: list[str]) -> None:
    for i, key in enumerate(keys):
        ops.run(RedisStore(url), ops.add_key(key, f"K{i}", 1))


def alerts(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("person_adds_a_key", [False, True])
async def test_a_pool_the_server_lost_comes_back_from_memory_with_every_count(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, person_adds_a_key: bool
) -> None:
    caplog.set_level(logging.INFO)
    url = redis_server.url
    add_keys(url, KEYS[:2])
    one, two = proxy(url), proxy(url)
    sent = [answer(one.pool) for _ in range(3)] + [answer(two.pool) for _ in range(2)]
    await one.save_once()
    await two.save_once()
    await one.save_once()  # each has read the other's counts
    sent += [answer(one.pool), answer(two.pool)]  # not saved yet
    redis_server.command("FLUSHALL")
    if person_adds_a_key:  # to the emptied store, before any proxy noticed
        ops.run(RedisStore(url), ops.add_key(KEYS[2], "K2", now_ms()))
    sent += [answer(one.pool), answer(two.pool)]
    for sync in (one, two, one, two):
        await sync.save_once()
    expected = {key: sent.count(key) for key in KEYS[: 3 if person_adds_a_key else 2]}
    assert stored_counts(url) == expected
    for sync in (one, two):
        assert {a.key: a.total_requests for a in sync.pool.accounts} == expected
    restored = alerts(caplog, "lost the pool")
    assert len(restored) == 1 and restored[0].levelno == ALERT
    found = "an older kimi-rotator:accounts" if person_adds_a_key else "no kimi-rotator:accounts"
    assert restored[0].getMessage().startswith(f"kimi-rotator: {url} lost the pool ({found}")
    assert "put it back from this proxy's memory: 2 key(s), with their counts" in restored[0].getMessage()
    changed = [r.getMessage() for r in alerts(caplog, "removed)")]  # the person's key, and no key gone
    assert changed == (["kimi-rotator: accounts file changed: 3 key(s) now (1 added, 0 removed)"] * 2
                       if person_adds_a_key else []), changed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_user_without_the_channel_saves_its_cooldowns_and_is_told_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    add_keys(redis_server.url, KEYS[:2])
    sync = proxy(acl_user(redis_server, ("&kimi-rotator:*",)))
    cooled = answer(sync.pool, *RATE_LIMITED)  # a decisive change: the team must be told
    for _ in range(3):
        await sync.save_once()
        answer(sync.pool)
    await sync.save_once()
    stored = {a.key: a for a in RedisStore(redis_server.url).read().accounts}
    assert stored[cooled].rate_limit_reset_time > now_ms() and stored[cooled].total_requests == 1
    assert sum(a.total_requests for a in stored.values()) == 4
    untold = alerts(caplog, "cannot tell the team")
    assert len(untold) == 1 and untold[0].levelno == logging.WARNING
    assert "cannot publish on kimi-rotator:notices" in untold[0].getMessage()
    assert "kimi:***@127.0.0.1" in untold[0].getMessage() and PASSWORD not in untold[0].getMessage()
    assert sync.problem is None
    redis_server.command("ACL", "SETUSER", "kimi", "&kimi-rotator:*")
    answer(sync.pool, *RATE_LIMITED)
    await sync.save_once()
    again = alerts(caplog, "told to the team")
    assert len(again) == 1 and again[0].levelno == ALERT


async def test_a_failed_write_is_a_write_and_stopping_says_how_many_requests_were_not_saved(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    add_keys(redis_server.url, KEYS[:2])
    sync = proxy(acl_user(redis_server))
    answer(sync.pool)
    await sync.save_once()
    redis_server.command("ACL", "SETUSER", "kimi", "-set")
    for _ in range(4):
        answer(sync.pool)
    await sync.save_once()
    answer(sync.pool, *RATE_LIMITED)
    await sync.stop()
    failed = alerts(caplog, "the team store")
    assert len(failed) == 2, [r.getMessage() for r in caplog.records]
    assert "cannot write the team store" in failed[0].getMessage()
    assert "permission denied: this user may not run SET" in failed[0].getMessage()
    assert failed[1].levelno == logging.ERROR and "counts of 5 request(s) not saved" in failed[1].getMessage()
    assert "may not run SET" in failed[1].getMessage()
    assert sum(stored_counts(redis_server.url).values()) == 1
