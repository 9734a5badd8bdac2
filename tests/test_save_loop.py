"""The save loop against a real accounts file: a person's change wins by time, and a
file that can't be read stays reported until it can."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rotator.admin import ops
from rotator.core import policy
from rotator.core.clock import now_ms
from rotator.core.models import Account, AccountsFile
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.store.file import FileStore, read_accounts, write_accounts
from rotator.sync.save_loop import PoolSync
from tests.support.accounts import KEYS



def setup(tmp_path: Path, strategy: str = "round-robin") -> tuple[FileStore, KeyPool, PoolSync]:
    path = tmp_path / "accounts.json"
    write_accounts(path, AccountsFile(accounts=[Account(key=k, name=f"k{i}") for i, k in enumerate(KEYS)],
                                      rotation_strategy=strategy))
    store = FileStore(path)
    pool = KeyPool(AccountsFile())
    sync = PoolSync(store, pool, 1.0)
    assert sync.load() is not None
    return store, pool, sync


def refuse(pool: KeyPool, status: int, body: bytes, headers: dict[str, str] | None = None) -> Lease:
    now = now_ms()
    lease = pool.acquire(now)
    assert isinstance(lease, Lease)
    pool.release(lease, policy.classify(status, headers or {}, body, now), now)
    return lease


async def test_enable_key_right_after_the_proxy_disabled_it_stays(tmp_path: Path) -> None:
    store, pool, sync = setup(tmp_path)
    refuse(pool, 401, b'{"error":{"message":"Invalid Authentication"}}')
    assert pool.accounts[0].disabled_reason is not None  # in memory, not saved yet
    message = ops.run(store, ops.enable_key(0, now_ms() + 1))  # the person, right after the log line
    assert "stays enabled" in message  # the file lags the proxy: it never showed the key disabled
    await sync.save_once()
    assert read_accounts(store.path).accounts[0].disabled_reason is None
    assert pool.accounts[0].disabled_reason is None
    assert read_accounts(store.path).accounts[0].total_requests == 1  # the proxy's count kept


async def test_clear_limits_right_after_a_cooldown_stays_cleared(tmp_path: Path) -> None:
    store, pool, sync = setup(tmp_path)
    refuse(pool, 429, b'{"error":{"message":"rate limited"}}', {"retry-after": "600"})
    assert pool.accounts[0].rate_limit_reset_time > now_ms()
    ops.run(store, ops.clear_limits(0, now_ms() + 1))
    await sync.save_once()
    on_disk = read_accounts(store.path).accounts[0]
    assert (on_disk.rate_limit_reset_time, on_disk.cooldown_reason, on_disk.cooldown_level) == (0, None, 0)
    assert pool.accounts[0].rate_limit_reset_time == 0


async def test_use_key_right_after_the_proxy_moved_on_stays(tmp_path: Path) -> None:
    store, pool, sync = setup(tmp_path)
    refuse(pool, 200, b"")  # round-robin moved the pool to key 1
    assert pool.state.active_index == 1
    ops.run(store, ops.use_key(0, now_ms() + 1))
    await sync.save_once()
    assert read_accounts(store.path).active_index == 0
    assert pool.state.active_index == 0


async def test_a_proxy_change_after_the_persons_still_counts(tmp_path: Path) -> None:
    store, pool, sync = setup(tmp_path, strategy="sticky")
    ops.run(store, ops.enable_key(0, now_ms() - 1000))
    refuse(pool, 401, b'{"error":{"message":"Invalid Authentication"}}')
    await sync.save_once()
    assert read_accounts(store.path).accounts[0].disabled_reason is not None


async def test_an_unreadable_file_is_not_declared_readable_until_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "accounts.json"
    path.write_text('{"version": 1, "accounts": [')  # truncated
    pool = KeyPool(AccountsFile())
    sync = PoolSync(FileStore(path), pool, 1.0)
    with caplog.at_level(logging.INFO):
        assert sync.load() is None
        for _ in range(3):
            await sync.save_once()
    assert sync.problem is not None and "not valid JSON" in sync.problem
    assert "readable again" not in caplog.text
    assert path.read_text() == '{"version": 1, "accounts": ['  # never overwritten
    write_accounts(path, AccountsFile(accounts=[Account(key=KEYS[0])]))
    with caplog.at_level(logging.INFO):
        await sync.save_once()
    assert sync.problem is None
    assert "readable again" in caplog.text
    assert [a.key for a in pool.accounts] == [KEYS[0]]


# -- a key removed and added again while requests on it are in flight (issue 23, item 6) --


async def test_late_answers_on_a_removed_then_re_added_key_count_on_no_entry(tmp_path: Path) -> None:
    store, pool, sync = setup(tmp_path, strategy="sticky")
    leases = [pool.acquire(now_ms()) for _ in range(3)]
    assert all(isinstance(lease, Lease) and lease.key == KEYS[0] for lease in leases)
    await sync.save_once()  # the three requests are counted on the key's entry
    ops.run(store, ops.remove_key(0))
    await sync.save_once()
    assert KEYS[0] not in [a.key for a in pool.accounts]
    ops.run(store, ops.add_key(KEYS[0], "again", now_ms()))  # a new entry: its counts start at 0
    await sync.save_once()
    for lease in leases:  # the answers sent with the removed entry come back now
        assert isinstance(lease, Lease)
        pool.release(lease, policy.classify(200, {}, b"{}", now_ms()), now_ms())
    await sync.save_once()
    again = next(a for a in read_accounts(store.path).accounts if a.key == KEYS[0])
    assert (again.total_requests, again.successful_requests) == (0, 0)  # was 0 requests, 3 successes
    assert (pool.account(KEYS[0]).total_requests, pool.account(KEYS[0]).successful_requests) == (0, 0)
    assert pool.in_flight == {}


async def test_the_store_going_and_coming_back_is_heard_once_each(tmp_path: Path) -> None:
    # The notifications of a team store hear this (rotator.proxy.assembly gives `heard`
    # to a shared store's save loop only); any store reports it the same way.
    path = tmp_path / "accounts.json"
    path.write_text('{"version": 1, "accounts": [')  # truncated
    heard: list[tuple[str, str | None]] = []
    store = FileStore(path)
    sync = PoolSync(store, KeyPool(AccountsFile()), 1.0, lambda where, why: heard.append((where, why)))
    assert sync.load() is None
    for _ in range(3):
        await sync.save_once()
    assert len(heard) == 1 and heard[0][0] == store.location
    assert heard[0][1] is not None and "not valid JSON" in heard[0][1]
    write_accounts(path, AccountsFile(accounts=[Account(key=KEYS[0])]))
    await sync.save_once()
    await sync.save_once()
    assert heard[1:] == [(store.location, None)]
