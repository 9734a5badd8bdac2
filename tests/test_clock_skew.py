"""Stamps and locks from the future (issue 23, defect 3): a person's stamp written by a
clock that ran ahead (a team member's machine, this one before an NTP step back), a hand
edit or an imported file must not stop the proxy from disabling a revoked key or cooling
a rate-limited one; nor may a lock directory whose mtime lies ahead hold the accounts
file until then. In-process on a fake clock, then through a real redis-server, then a
real mitmdump in front of the fake Kimi."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import rotator.cli.main as cli
from rotator.admin import ops
from rotator.core import policy
from rotator.core.clock import AHEAD_SLACK_MS, SYSTEM_CLOCK, Timer, now_ms
from rotator.core.models import Account, AccountsFile
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.store import file as storage
from rotator.store.file import FileStore, read_accounts
from rotator.store.lock import STALE_S, Found, judge
from rotator.store.redis_store import RedisStore
from rotator.sync.save_loop import PoolSync
from testbed.hooks import FakeClock
from tests.support.accounts import KEYS
from tests.support.e2e import FILE_DEADLINE_S, client, messages_by, send
from tests.support.harness import accounts_on_disk, poll, run_cli

HOUR = 3_600_000
REVOKED_BODY = b'{"error":{"type":"invalid_authentication_error","message":"Invalid Authentication"}}'


def pool_state(keys: list[str] = KEYS) -> AccountsFile:
    return AccountsFile(accounts=[Account(key=k, name=f"k{i}") for i, k in enumerate(keys)],
                        rotation_strategy="round-robin")


def stamped_ahead(state: AccountsFile, at_ms: int) -> AccountsFile:
    """A person's enable-key 0 and clear-limits 1, stamped `at_ms` (a clock ahead)."""
    ops.enable_key(0, at_ms)(state)
    ops.clear_limits(1, at_ms)(state)
    return state


def stamps(state: AccountsFile) -> list[int]:
    return [*state.edited_at.values(), *(v for a in state.accounts for v in a.edited_at.values())]


async def serve_rounds(sync: PoolSync, pool: KeyPool, now: Callable[[], int], advance: Callable[[], None],
                       rounds: int = 5) -> dict[str, int]:
    """`rounds` requests, each on the key the pool picks and saved before the next: key 0
    answers 401 (revoked), key 1 429 (rate limited), key 2 200. How often each was used."""
    used = dict.fromkeys(KEYS, 0)
    for _ in range(rounds):
        at = now()
        lease = pool.acquire(at)
        assert isinstance(lease, Lease), lease
        used[lease.key] += 1
        if lease.key == KEYS[0]:
            outcome = policy.classify(401, {}, REVOKED_BODY, at)
        elif lease.key == KEYS[1]:
            outcome = policy.classify(429, {"retry-after": "60"}, b"", at)
        else:
            outcome = policy.classify(200, {}, b"{}", at)
        pool.release(lease, outcome, at)
        advance()
        await sync.save_once()  # and the state the store holds now is adopted
        assert sync.problem is None, sync.problem
    return used


def assert_disabled_and_cooling(state: AccountsFile, now: int) -> None:
    assert state.accounts[0].disabled_reason is not None, state.accounts[0]
    assert state.accounts[1].rate_limit_reset_time > now, state.accounts[1]


# -- a file stamped ahead: in-process, the proxy's clock a fake one ----------------------


async def test_a_file_stamped_an_hour_ahead_still_lets_the_proxy_disable_and_cool(tmp_path: Path):
    clock = FakeClock()
    path = tmp_path / "accounts.json"
    storage.write_accounts(path, stamped_ahead(pool_state(), clock.now + HOUR))  # a hand edit, an import
    pool = KeyPool(AccountsFile(), clock=clock)
    sync = PoolSync(FileStore(path, clock), pool, 1.0)
    assert sync.load() is not None
    used = await serve_rounds(sync, pool, clock.now_ms, lambda: clock.advance(300))
    assert used == {KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 3}  # each refusal once, then never again
    on_disk = read_accounts(path)
    assert_disabled_and_cooling(on_disk, clock.now)
    # The stamps from the future were read as "now": none is ahead any more.
    assert max(stamps(on_disk)) <= clock.now


async def test_after_the_clock_steps_back_the_cli_s_stamps_do_not_blind_the_proxy(tmp_path: Path):
    # The CLI stamped with the machine's clock; then NTP stepped it back an hour: every
    # stamp is now an hour ahead of the proxy's clock.
    path = tmp_path / "accounts.json"
    storage.write_accounts(path, pool_state())
    for args in (["enable-key", "0"], ["clear-limits", "1"]):
        assert run_cli(path, *args, in_process=True).returncode == 0
    clock = FakeClock(now_ms() - HOUR)
    pool = KeyPool(AccountsFile(), clock=clock)
    sync = PoolSync(FileStore(path, clock), pool, 1.0)
    assert sync.load() is not None
    used = await serve_rounds(sync, pool, clock.now_ms, lambda: clock.advance(300))
    assert used == {KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 3}
    assert_disabled_and_cooling(read_accounts(path), clock.now)


def test_a_person_s_stamp_from_a_clock_ahead_is_written_as_the_store_s_time(tmp_path: Path, monkeypatch):
    path = tmp_path / "accounts.json"
    storage.write_accounts(path, pool_state())
    monkeypatch.setattr(cli, "now_ms", lambda: now_ms() + HOUR)
    before = now_ms()
    assert run_cli(path, "enable-key", "0", in_process=True).returncode == 0
    stamp = read_accounts(path).accounts[0].edited_at["disabledReason"]
    assert before - AHEAD_SLACK_MS <= stamp <= now_ms()


# -- a team store: the server's time, whatever the machines' clocks say -----------------


def server_ms(redis_server) -> int:
    seconds, micros = redis_server.command("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


def team_pool(url: str) -> None:
    store = RedisStore(url)
    for i, key in enumerate(KEYS):
        ops.run(store, ops.add_key(key, f"k{i}", 1))
    ops.run(store, ops.set_strategy("round-robin", 1))


async def test_a_cli_whose_clock_runs_an_hour_ahead_stamps_the_team_store_with_the_servers_time(
        redis_server, monkeypatch):
    team_pool(redis_server.url)
    monkeypatch.setattr(cli, "now_ms", lambda: now_ms() + HOUR)
    before = server_ms(redis_server)
    assert cli.main(["--store", redis_server.url, "enable-key", "0"]) == 0
    assert cli.main(["--store", redis_server.url, "clear-limits", "1"]) == 0
    stored = RedisStore(redis_server.url).read()
    assert before <= max(stamps(stored)) <= server_ms(redis_server)
    # A proxy on a good clock, started after: the person's edits do not blind it.
    pool = KeyPool(AccountsFile())
    sync = PoolSync(RedisStore(redis_server.url), pool, 1.0)
    assert sync.load() is not None
    used = await serve_rounds(sync, pool, SYSTEM_CLOCK.now_ms, lambda: None)
    assert used == {KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 3}
    assert_disabled_and_cooling(RedisStore(redis_server.url).read(), now_ms())


class ClockBehind:
    """This machine's clock set an hour back: it runs as the server's does, an hour behind."""

    def now_ms(self) -> int:
        return now_ms() - HOUR

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Timer:
        return SYSTEM_CLOCK.call_at(when_ms + HOUR, callback)


async def test_a_proxy_whose_clock_runs_an_hour_behind_the_server_still_disables_and_cools(redis_server):
    team_pool(redis_server.url)
    assert cli.main(["--store", redis_server.url, "enable-key", "0"]) == 0
    assert cli.main(["--store", redis_server.url, "clear-limits", "1"]) == 0
    clock = ClockBehind()
    pool = KeyPool(AccountsFile(), clock=clock)
    sync = PoolSync(RedisStore(redis_server.url, clock=clock), pool, 1.0)
    assert sync.load() is not None
    used = await serve_rounds(sync, pool, clock.now_ms, lambda: None)
    assert used == {KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 3}
    assert_disabled_and_cooling(RedisStore(redis_server.url).read(), clock.now_ms())


async def test_a_team_store_stamped_an_hour_ahead_is_read_as_now(redis_server):
    ahead = stamped_ahead(pool_state(), server_ms(redis_server) + HOUR)  # set by hand, or an old CLI
    redis_server.command("SET", "kimi-rotator:accounts", ahead.to_json())
    redis_server.command("SET", "kimi-rotator:version", "1")
    pool = KeyPool(AccountsFile())
    sync = PoolSync(RedisStore(redis_server.url), pool, 1.0)
    assert sync.load() is not None
    used = await serve_rounds(sync, pool, SYSTEM_CLOCK.now_ms, lambda: None)
    assert used == {KEYS[0]: 1, KEYS[1]: 1, KEYS[2]: 3}
    stored = RedisStore(redis_server.url).read()
    assert_disabled_and_cooling(stored, now_ms())
    assert max(stamps(stored)) <= server_ms(redis_server)


# -- a lock directory from the future ----------------------------------------------------


def lock_from_the_future(accounts: Path) -> Path:
    lock = accounts.with_name(accounts.name + ".lock")
    lock.mkdir()  # unmarked: as the plugin (proper-lockfile) makes it, or a restored copy
    ahead = time.time() + 3600
    os.utime(lock, (ahead, ahead))
    return lock


def test_a_lock_directory_from_the_future_is_judged_abandoned(tmp_path: Path):
    folder = tmp_path / "x.lock"
    folder.mkdir()
    now = time.time()
    assert judge(os.stat(folder), now, STALE_S) is Found.HELD
    assert judge(os.stat(folder), now - STALE_S + 1, STALE_S) is Found.HELD  # within the margin
    assert judge(os.stat(folder), now - STALE_S - 1, STALE_S) is Found.AHEAD


@pytest.mark.slow
def test_cli_edit_takes_over_a_lock_from_the_future_and_says_so(tmp_path: Path):
    accounts = tmp_path / "kimi-accounts.json"
    storage.write_accounts(accounts, pool_state(KEYS[:1]))
    lock = lock_from_the_future(accounts)
    started = time.monotonic()
    added = run_cli(accounts, "add-key", KEYS[1], "Ours")  # its own process: its log reaches stderr
    assert added.returncode == 0, added.stderr
    assert time.monotonic() - started < storage.LOCK_TIMEOUT_S
    assert "in the future" in added.stderr and str(lock) in added.stderr, added.stderr
    assert [a["key"] for a in accounts_on_disk(accounts)] == KEYS[:2]
    assert not lock.exists()


async def test_a_proxy_save_takes_over_a_lock_from_the_future(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(storage, "LOCK_TIMEOUT_S", 0.5)  # a lock judged held fails fast
    accounts = tmp_path / "kimi-accounts.json"
    storage.write_accounts(accounts, pool_state(KEYS[:1]))
    pool = KeyPool(AccountsFile())
    sync = PoolSync(FileStore(accounts), pool, 1.0)
    assert sync.load() is not None
    assert isinstance(pool.acquire(now_ms()), Lease)  # one request to count
    lock = lock_from_the_future(accounts)
    with caplog.at_level(logging.INFO):
        await sync.save_once()
    assert sync.problem is None, sync.problem
    assert read_accounts(accounts).accounts[0].total_requests == 1
    assert not lock.exists()
    assert any("in the future" in r.getMessage() for r in caplog.records), caplog.text


# -- end to end: a real mitmdump, the fake Kimi, a file stamped an hour ahead -------------


def test_mitmdump_disables_and_cools_keys_in_a_file_stamped_an_hour_ahead(
        fake_kimi, keys, accounts_path, start_proxy):
    accounts_path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_accounts(accounts_path, stamped_ahead(pool_state(keys), now_ms() + HOUR))
    fake_kimi.set_kimi_error(keys[0], "invalid_auth")  # 401, every time
    fake_kimi.set_kimi_error(keys[1], "overloaded")  # 429, every time: cools it 60 s
    proxy = start_proxy(fake_kimi)  # saves every 0.2 s
    with client() as c:
        for _ in range(6):
            assert send(c, proxy).status_code == 200
            # Saved, and what the store holds adopted, before the next request.
            seen = len(fake_kimi.message_requests())
            assert poll(lambda: sum(a.get("totalRequests", 0) for a in accounts_on_disk(accounts_path)) == seen,
                        FILE_DEADLINE_S), accounts_on_disk(accounts_path)
    assert len(messages_by(fake_kimi, keys[0])) == 1  # the 401, then never again
    assert len(messages_by(fake_kimi, keys[1])) == 1  # the 429, then cooling
    assert proxy.stop() == 0
    on_disk = read_accounts(accounts_path)
    assert_disabled_and_cooling(on_disk, now_ms())
    assert max(stamps(on_disk)) <= now_ms() + AHEAD_SLACK_MS
