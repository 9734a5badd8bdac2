"""Durability of the accounts file: crashes, concurrent writers, hot reload, bad files.

Real processes throughout: writers killed with SIGKILL, the CLI as a subprocess
(``python -m rotator.cli``), real ``mitmdump`` proxies (reverse mode) in front of the
fake Kimi server, driven by httpx clients in threads. Everything stays on 127.0.0.1.

The fake server answers 200 to everything here, so "requests the fake logged for a
key" is both the key's ``totalRequests`` and its ``successfulRequests`` once every
proxy has stopped (SIGINT, so the addon's final save in ``done()`` has run).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from rotator.core import policy
from rotator.core.models import Account, AccountsFile
from rotator.store import file as storage
from rotator.store.lock import DirLock
from testbed.fake_kimi import MESSAGES_PATH, FakeKimi
from testbed.processes import Proxy
from tests.support.accounts import fake_key
from tests.support.harness import FLUSH_INTERVAL_S
from tests.support.harness import counts_on_disk, counts_seen, poll, run_cli
from tests.support.in_process import addon_in_taddons

MSG = {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"x-api-key": "sk-kimi-placeholder", "User-Agent": "claude-cli/2.0.14 (external, cli)"}
PROBLEM_LOG = "cannot read the accounts file"
WATCHED_SAVES = 5  # save intervals watched after the proxy reported a bad file


# -- helpers ---------------------------------------------------------------------------


def send(c: httpx.Client, proxy: Proxy) -> httpx.Response:
    return c.post(proxy.url + MESSAGES_PATH, json=MSG, headers=HEADERS)


def new_client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=30)


class Load:
    """`threads` httpx clients sending to `proxies` (round-robin per thread) until
    `total` requests were sent or `stop()` / the deadline ends it."""

    def __init__(self, proxies: list[Proxy], threads: int = 8, total: int = 300,
                 seconds: float | None = None, pace: float = 0.0) -> None:
        self.proxies = proxies
        self.total = total
        self.pace = pace
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self._tickets = itertools.count()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.statuses: list[int | str] = []
        self.by_proxy: dict[int, int] = {}
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def _run(self, n: int) -> None:
        proxy = self.proxies[n % len(self.proxies)]
        with new_client() as c:
            while not self._stop.is_set():
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    return
                if next(self._tickets) >= self.total:
                    return
                try:
                    status: int | str = send(c, proxy).status_code
                except httpx.HTTPError as e:  # recorded, and fails the test's status check
                    status = repr(e)
                with self._lock:
                    self.statuses.append(status)
                    self.by_proxy[proxy.port] = self.by_proxy.get(proxy.port, 0) + 1
                if self.pace:
                    time.sleep(self.pace)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 60.0) -> list[int | str]:
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, end - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "load threads did not finish"
        return self.statuses


def caught_up(path: Path, fake: FakeKimi, keys: list[str], timeout: float = 3.0) -> bool:
    """Wait until the file's counts for `keys` equal the fake's: the periodic saves have
    caught up. Done before stopping a proxy wherever the final save is not what the test
    is about, so a save still pending at SIGINT can't decide the outcome (see
    test_stopping_while_a_save_waits_for_its_thread_loses_nothing)."""
    return bool(poll(lambda: counts_on_disk(path) == counts_seen(fake, keys), timeout))


def cli_ok(path: Path, *args: str) -> str:
    done = run_cli(path, *args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def index_of(path: Path, key: str) -> int:
    index = storage.read_accounts(path).index_of(key)
    assert index is not None, key
    return index


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold the accounts file's cross-process lock (the one every writer takes), so a
    swap of the file happens in one step for the proxy."""
    with storage._locked(path):
        yield


def replace_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".test-swap")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def snapshot(path: Path) -> bytes | str:
    """The file's bytes, or a marker for a directory standing in its place."""
    if path.is_dir():
        return f"<dir {sorted(os.listdir(path))}>"
    return path.read_bytes()


def temp_leftovers(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


# -- 1. a writer killed at any moment leaves a whole file -------------------------------

BASE_KEYS = 3


def _writer_forever(path: Path, child_no: int) -> None:
    """Rewrite the file as fast as possible, alternating small and ~150 KB contents,
    alternating update_accounts (locked) and a plain write_accounts. Every write bumps
    `writerSeq` and each base key's totalRequests by one, so a whole file always has
    base totals == writerSeq. Base keys are never removed."""
    for i in itertools.count():
        large = i % 2 == 1
        extras = [
            Account(key=fake_key(f"c{child_no}i{i}j{j}"), name=("x" * 300 if large else "small"))
            for j in range(400 if large else 1)
        ]

        def change(state: AccountsFile) -> AccountsFile:
            seq = (state.model_extra or {}).get("writerSeq", 0) + 1
            for account in state.accounts[:BASE_KEYS]:
                account.total_requests += 1
            state.accounts = state.accounts[:BASE_KEYS] + extras
            state.writerSeq = seq  # an unknown field: kept by the model (extra="allow")
            return state

        if i % 4 == 3:
            storage.write_accounts(path, change(storage.read_accounts(path)))
        else:
            storage.update_accounts(path, change)


def test_a_writer_killed_at_random_moments_always_leaves_a_whole_file(accounts_path, keys, write_accounts):
    write_accounts(keys)
    rng = random.Random(4)
    kills, last_seq, advanced, reads = 0, 0, 0, 0

    def check_whole_file() -> int:
        state = storage.read_accounts(accounts_path)  # parses, or raises
        assert [a.key for a in state.accounts[:BASE_KEYS]] == keys
        seq = (state.model_extra or {}).get("writerSeq", 0)
        # One whole write: every base key carries exactly the writes so far.
        assert [a.total_requests for a in state.accounts[:BASE_KEYS]] == [seq] * BASE_KEYS
        assert seq >= last_seq
        assert stat.S_IMODE(accounts_path.stat().st_mode) == 0o600
        return seq

    started = time.monotonic()
    while kills < 30 and time.monotonic() - started < 12:
        seq_before = last_seq
        pid = os.fork()
        if pid == 0:  # the child: write until killed
            try:
                _writer_forever(accounts_path, kills)
            finally:
                os._exit(0)
        # Meanwhile a reader (the proxy, the CLI) never sees half a file.
        kill_at = time.monotonic() + rng.uniform(0.005, 0.15)
        while time.monotonic() < kill_at:
            last_seq = check_whole_file()
            reads += 1
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        kills += 1

        seq = check_whole_file()
        advanced += seq > seq_before
        last_seq = seq
    assert kills >= 20
    # The writers really were writing (and the lock of a killed writer never stuck).
    assert advanced >= kills // 2, (advanced, kills)

    leftovers = temp_leftovers(accounts_path)
    # A writer killed between mkstemp and rename leaves its temp file (nobody cleans
    # them up); they hold full keys, so at least they must be private.
    for tmp in leftovers:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600, tmp
    print(f"\n{kills} kills ({advanced} after writing), {last_seq} writes, {reads} reads meanwhile, "
          f"{len(leftovers)} temp file(s) left behind")


# -- 2. the CLI adds and removes keys while a proxy is under load -----------------------


def test_cli_changes_under_load_lose_no_key_and_no_count(fake_kimi, keys, accounts_path, write_accounts, start_proxy):
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi)
    load = Load([proxy], threads=8, total=5000, pace=0.05).start()

    temp = [fake_key(f"temp{i}") for i in range(12)]
    kept, removed = [], []
    try:
        for i, key in enumerate(temp):
            cli_ok(accounts_path, "add-key", key, f"Temp {i}")
            if i % 3 == 2:  # remove the two added before this one, keep every third
                for gone in (temp[i - 2], temp[i - 1]):
                    cli_ok(accounts_path, "remove-key", str(index_of(accounts_path, gone)))
                    removed.append(gone)
                kept.append(key)
    finally:
        load.stop()
    statuses = load.join()
    kept_keys = keys + kept
    assert caught_up(accounts_path, fake_kimi, kept_keys), (
        counts_on_disk(accounts_path), counts_seen(fake_kimi, kept_keys))
    proxy.stop()

    assert statuses and set(statuses) == {200}, (sorted(set(map(str, statuses))), proxy.output()[-3000:])
    assert len(statuses) >= 200, len(statuses)
    on_disk = counts_on_disk(accounts_path)
    assert [a.key for a in storage.read_accounts(accounts_path).accounts] == keys + kept
    assert not set(removed) & set(on_disk)
    # Keys still in the file carry exactly the traffic the fake saw for them (removed
    # keys took their counts with them).
    assert on_disk == counts_seen(fake_kimi, keys + kept)
    assert all(on_disk[k][0] > 0 for k in keys)
    # The proxy really did use keys the CLI added while it ran.
    assert set(fake_kimi.count_by_key()) & set(temp), "no added key was ever used"
    print(f"\n{len(statuses)} requests during {len(kept) + 2 * len(removed)} CLI changes")


# -- 3. two proxies on one file ----------------------------------------------------------


def test_two_proxies_on_one_file_add_up_exactly(fake_kimi, keys, accounts_path, write_accounts, start_proxy):
    write_accounts(keys, "round-robin")
    # The shortest flush interval allowed: the two proxies' saves overlap often.
    fast = {"kimi_flush_interval": "0.05"}
    first, second = start_proxy(fake_kimi, options=fast), start_proxy(fake_kimi, options=fast)
    load = Load([first, second], threads=8, total=400).start()
    statuses = load.join()
    # Counts are already merged while both run, before any final save.
    assert caught_up(accounts_path, fake_kimi, keys, 5), (counts_on_disk(accounts_path), counts_seen(fake_kimi, keys))
    first.stop()
    second.stop()

    assert set(statuses) == {200} and len(statuses) == 400, sorted(set(map(str, statuses)))
    assert len(load.by_proxy) == 2 and min(load.by_proxy.values()) >= 80, load.by_proxy
    assert sum(fake_kimi.count_by_key().values()) == 400
    assert counts_on_disk(accounts_path) == counts_seen(fake_kimi, keys)


# -- 4. hot reload -----------------------------------------------------------------------


def test_added_key_serves_and_removed_key_stops_within_two_seconds(
    fake_kimi, keys, accounts_path, write_accounts, start_proxy
):
    write_accounts(keys[:2], "sticky")
    proxy = start_proxy(fake_kimi, options={"kimi_flush_interval": "1.0"})
    new = fake_key("hotreload")
    with new_client() as c:
        assert send(c, proxy).status_code == 200
        assert fake_kimi.keys_seen() == [keys[0]]

        cli_ok(accounts_path, "add-key", new, "Hot")
        cli_ok(accounts_path, "use-key", "2")
        changed = time.monotonic()

        def new_key_served() -> bool:
            assert send(c, proxy).status_code == 200
            return fake_kimi.keys_seen()[-1] == new

        assert poll(new_key_served, 2.0, interval=0.05), (fake_kimi.keys_seen(), proxy.output())
        took_add = time.monotonic() - changed
        assert all(send(c, proxy).status_code == 200 for _ in range(3))
        assert fake_kimi.keys_seen()[-3:] == [new] * 3  # sticky stays on it

        cli_ok(accounts_path, "remove-key", "2")
        changed = time.monotonic()

        def new_key_dropped() -> bool:
            assert send(c, proxy).status_code == 200
            return fake_kimi.keys_seen()[-1] != new

        assert poll(new_key_dropped, 2.0, interval=0.05), (fake_kimi.keys_seen(), proxy.output())
        took_remove = time.monotonic() - changed
        assert all(send(c, proxy).status_code == 200 for _ in range(5))
        assert new not in fake_kimi.keys_seen()[-5:]
    assert "accounts file changed" in proxy.output()
    print(f"\nadded key in use after {took_add:.2f} s, removed key unused after {took_remove:.2f} s")


def test_proxy_started_without_a_file_serves_a_key_added_later(fake_kimi, accounts_path, start_proxy):
    assert not accounts_path.exists()
    proxy = start_proxy(fake_kimi, options={"kimi_flush_interval": "1.0"})
    started = proxy.output()
    assert "no Kimi API keys" in started and "add-key" in started, started
    key = fake_key("firstkey")
    with new_client() as c:
        answer = send(c, proxy)
        assert answer.status_code == 503
        body = answer.json()
        assert body["type"] == "error"
        assert isinstance(body["error"]["type"], str) and body["error"]["type"]
        assert "add-key sk-kimi-" in body["error"]["message"]  # with --accounts: the file this proxy reads
        assert fake_kimi.requests == []  # answered by the proxy itself
        assert not accounts_path.exists()  # nothing to save: no file is created
        cli_ok(accounts_path, "add-key", key, "First")
        assert poll(lambda: send(c, proxy).status_code == 200, 2.0, interval=0.05), proxy.output()
    assert fake_kimi.keys_seen() == [key]
    assert caught_up(accounts_path, fake_kimi, [key])
    proxy.stop()
    assert counts_on_disk(accounts_path) == counts_seen(fake_kimi, [key])


class _WriteRightAfterUnlock:
    """Make another writer (as the CLI would) change the file the moment a lock on it
    is released: the window between a flush's write and whatever it remembers of it."""

    def __init__(self, path: Path, new_key: str) -> None:
        self.path = path
        self.new_key = new_key
        self.armed = False
        self.fired = False

    def __call__(self, release: Callable[..., None]) -> Callable[..., None]:
        hook = self

        def wrapped(lock: Any, *args: Any, **kwargs: Any) -> None:
            release(lock, *args, **kwargs)
            if hook.armed and not lock.held:
                hook.armed = False
                storage.update_accounts(
                    hook.path, lambda s: (s.accounts.append(Account(key=hook.new_key)), s)[1]
                )
                hook.fired = True

        return wrapped


async def test_a_change_right_after_a_flush_is_still_picked_up(tmp_path, keys, monkeypatch):
    path = tmp_path / "accounts.json"
    storage.write_accounts(path, AccountsFile(accounts=[Account(key=k) for k in keys[:2]]))
    hook = _WriteRightAfterUnlock(path, keys[2])
    monkeypatch.setattr(DirLock, "release", hook(DirLock.release))
    with addon_in_taddons() as (addon, tctx):
        tctx.configure(addon, kimi_accounts=str(path))
        addon.pool.acquire(int(time.time() * 1000))  # something to save
        hook.armed = True
        await addon.sync.save_once()  # what every flush does: merge under the lock, then remember
        assert hook.fired
        assert len(storage.read_accounts(path).accounts) == 3
        for _ in range(3):  # idle flushes: nothing of ours to save, only the file to watch
            await addon.sync.save_once()
        assert [a.key for a in addon.pool.accounts] == keys


# -- 5. a bad accounts file --------------------------------------------------------------

BAD_KINDS = ["corrupt", "directory", "version"]


def break_file(path: Path, kind: str) -> bytes:
    """Break the file under the lock (so the proxy never sees a missing file in
    between); returns the good bytes it had."""
    with file_lock(path):
        good = path.read_bytes()
        if kind == "corrupt":
            replace_bytes(path, good[: len(good) // 2])
        elif kind == "version":
            data = json.loads(good)
            data["version"] = 2
            replace_bytes(path, json.dumps(data, indent=2).encode())
        else:
            path.unlink()
            path.mkdir()
    return good


def restore_file(path: Path, good: bytes) -> None:
    with file_lock(path):
        if path.is_dir():
            path.rmdir()
        replace_bytes(path, good)


EXPECTED_PROBLEM = {"corrupt": "not valid JSON", "directory": "Is a directory", "version": "unsupported version 2"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_cli_refuses_a_bad_file_in_one_line_and_leaves_it_alone(kind, keys, accounts_path, write_accounts):
    write_accounts(keys)
    break_file(accounts_path, kind)
    before = snapshot(accounts_path)
    for args in (["list-keys"], ["add-key", fake_key("cli-bad"), "New"], ["remove-key", "0"], ["use-key", "1"]):
        done = run_cli(accounts_path, *args)
        assert done.returncode == 1, (args, done)
        lines = done.stderr.splitlines()
        assert len(lines) == 1, (args, done.stderr)
        assert str(accounts_path) in lines[0] and EXPECTED_PROBLEM[kind] in lines[0], lines
        assert done.stdout == ""
        assert snapshot(accounts_path) == before
    assert temp_leftovers(accounts_path) == []


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_running_proxy_survives_a_bad_file_and_merges_once_it_is_fixed(
    kind, fake_kimi, keys, accounts_path, write_accounts, start_proxy
):
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi)  # flushes every 0.2 s
    with new_client() as c:
        assert all(send(c, proxy).status_code == 200 for _ in range(9))
        assert poll(lambda: counts_on_disk(accounts_path) == counts_seen(fake_kimi, keys), 3)

        good = break_file(accounts_path, kind)
        broken = snapshot(accounts_path)
        before_break = len(fake_kimi.keys_seen())
        # Requests keep flowing over many flush intervals; the file is left as it is.
        # The proxy says so at its first save that fails, and only then: requests go on
        # for WATCHED_SAVES more of its save intervals after that line.
        served, logged_at = 0, None
        give_up = time.monotonic() + 10
        while logged_at is None or served < 20 or time.monotonic() - logged_at < WATCHED_SAVES * FLUSH_INTERVAL_S:
            assert time.monotonic() < give_up, (served, logged_at, proxy.output())
            assert send(c, proxy).status_code == 200
            served += 1
            assert snapshot(accounts_path) == broken
            if logged_at is None and PROBLEM_LOG in proxy.output():
                logged_at = time.monotonic()
            time.sleep(0.02)
        assert set(fake_kimi.keys_seen()[before_break:]) == set(keys)  # the last good pool
        out = proxy.output()
        assert out.count(PROBLEM_LOG) == 1, out
        line = next(line for line in out.splitlines() if PROBLEM_LOG in line)
        assert str(accounts_path) in line and EXPECTED_PROBLEM[kind] in line, line
        assert snapshot(accounts_path) == broken
        assert temp_leftovers(accounts_path) == []

        # Fixed by putting the last good file back: what was served meanwhile is merged.
        restore_file(accounts_path, good)
        assert poll(lambda: counts_on_disk(accounts_path) == counts_seen(fake_kimi, keys), 3), (
            counts_on_disk(accounts_path), counts_seen(fake_kimi, keys), proxy.output())
        assert poll(lambda: "readable again" in proxy.output(), 2), proxy.output()
        assert all(send(c, proxy).status_code == 200 for _ in range(3))
    assert caught_up(accounts_path, fake_kimi, keys)
    proxy.stop()
    assert proxy.output().count(PROBLEM_LOG) == 1
    assert counts_on_disk(accounts_path) == counts_seen(fake_kimi, keys)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_proxy_started_on_a_bad_file_explains_it_to_clients(
    kind, fake_kimi, keys, accounts_path, write_accounts, start_proxy
):
    write_accounts(keys)
    good = break_file(accounts_path, kind)
    broken = snapshot(accounts_path)
    proxy = start_proxy(fake_kimi)  # today: RuntimeError, mitmdump exited 1
    with new_client() as c:
        answer = send(c, proxy)
        assert answer.status_code == 503
        body = answer.json()
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
        assert str(accounts_path) in body["error"]["message"]
        assert EXPECTED_PROBLEM[kind] in body["error"]["message"]
        assert fake_kimi.keys_seen() == []
        # Nothing to wait for: over three of the proxy's own save intervals, nothing
        # may happen (no second log line, no write).
        time.sleep(3 * FLUSH_INTERVAL_S)
        assert send(c, proxy).status_code == 503
        assert snapshot(accounts_path) == broken
        assert proxy.output().count(PROBLEM_LOG) == 1

        restore_file(accounts_path, good)

        def served() -> bool:
            return send(c, proxy).status_code == 200

        assert poll(served, 3, interval=0.1), proxy.output()
    assert caught_up(accounts_path, fake_kimi, keys)
    proxy.stop()
    assert counts_on_disk(accounts_path) == counts_seen(fake_kimi, keys)


# -- 6. saving stays off the hot path ----------------------------------------------------


def test_under_load_the_file_is_written_once_per_flush_interval_not_per_request(
    fake_kimi, keys, accounts_path, write_accounts, start_proxy
):
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi, options={"kimi_flush_interval": "1.0"})
    writes = 0
    stop = threading.Event()
    watching = threading.Event()

    def watch() -> None:
        # Every save is an atomic replace: a new inode (and mtime) each time.
        nonlocal writes
        last = None
        while not stop.is_set():
            st = os.stat(accounts_path)
            sig = (st.st_ino, st.st_mtime_ns)
            if last is not None and sig != last:
                writes += 1
            last = sig
            watching.set()  # the file as it was before the load is known
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(5)
    statuses = Load([proxy], threads=8, total=100_000, seconds=3.0).start().join()
    stop.set()
    watcher.join(5)
    assert caught_up(accounts_path, fake_kimi, keys)
    proxy.stop()

    assert set(statuses) == {200}, sorted(set(map(str, statuses)))
    assert len(statuses) >= 100, len(statuses)
    assert 1 <= writes <= 6, (writes, len(statuses))
    assert counts_on_disk(accounts_path) == counts_seen(fake_kimi, keys)
    print(f"\n{len(statuses)} requests in 3 s, {writes} writes of the file")


# -- 7. counts survive a restart ---------------------------------------------------------


@pytest.mark.parametrize("interval", ["0.05", "30.0"], ids=["frequent-flush", "final-save-only"])
def test_counts_add_up_across_a_restart(interval, fake_kimi, keys, accounts_path, write_accounts, start_proxy):
    # final-save-only: no periodic save runs within the test, every count on disk comes
    # from the save in done(). frequent-flush: the saves catch up before each SIGINT.
    periodic = float(interval) < 10
    write_accounts(keys, "round-robin")
    first = start_proxy(fake_kimi, options={"kimi_flush_interval": interval})
    assert set(Load([first], threads=4, total=60).start().join()) == {200}
    if periodic:
        assert caught_up(accounts_path, fake_kimi, keys)
    assert first.stop() == 0, first.output()
    counts = counts_on_disk(accounts_path)
    assert (sum(t for t, _ in counts.values()), counts) == (60, counts_seen(fake_kimi, keys)), first.output()

    second = start_proxy(fake_kimi, options={"kimi_flush_interval": interval})
    assert set(Load([second], threads=4, total=40).start().join()) == {200}
    if periodic:
        assert caught_up(accounts_path, fake_kimi, keys)
    assert second.stop() == 0, second.output()
    counts = counts_on_disk(accounts_path)
    assert sum(fake_kimi.count_by_key().values()) == 100
    assert (sum(t for t, _ in counts.values()), sum(s for _, s in counts.values())) == (100, 100), (
        counts, second.output())
    assert counts == counts_seen(fake_kimi, keys)


async def test_stopping_while_a_save_waits_for_its_thread_loses_nothing(tmp_path, keys):
    path = tmp_path / "accounts.json"
    storage.write_accounts(path, AccountsFile(accounts=[Account(key=k) for k in keys]))
    loop = asyncio.get_running_loop()
    gate = threading.Event()
    busy: list[asyncio.Future[bool]] = []
    try:
        with addon_in_taddons(path, kimi_flush_interval="0.05", kimi_status="off") as (addon, _):
            now = int(time.time() * 1000)
            for _ in range(5):  # five answered requests, not saved yet
                lease = addon.pool.acquire(now)
                addon.pool.release(lease, policy.classify(200, {}, b"{}", now), now)
            # Every worker of the default executor busy (as with DNS lookups or a slow
            # disk): the next save's thread has to wait in the queue.
            busy = [loop.run_in_executor(None, gate.wait, 10) for _ in range(40)]
            addon.running()
            # The first save (0.05 s on) takes the changes and waits for a thread.
            await until(lambda: not addon.pool.changes)
            stopping = addon.done()  # SIGINT now (a fix may make done() a coroutine)
            if asyncio.iscoroutine(stopping):
                stopping = asyncio.ensure_future(stopping)
                # Stopping has begun: the save loop is cancelled, its save still waits.
                await until(lambda: addon.sync._task is None)
                assert not stopping.done()
            gate.set()
            if isinstance(stopping, asyncio.Future):
                await asyncio.wait_for(stopping, 10)
    finally:
        gate.set()
        await asyncio.gather(*busy)
    expected = {k: (n, n) for k, n in zip(keys, (5, 0, 0))}
    if not isinstance(stopping, asyncio.Future):  # done() did not wait: its save may still run
        await until(lambda: counts_on_disk(path) == expected)
    assert counts_on_disk(path) == expected


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Let the event loop run until `condition()` holds (at most `timeout` s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.005)
