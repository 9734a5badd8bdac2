"""Odd and hostile accounts files (issue 13: 5, 7, 9, 11, 12): deeply nested JSON,
symlinked files, duplicate keys, a truncated file at start, activeIndex out of range,
and write or lock failures worded as what they are.

The CLI runs as a subprocess (``python -m rotator.cli``, through tests.support.harness.run_cli),
the proxy as a real ``mitmdump`` in reverse mode in front of the fake Kimi server (which
answers 200 to everything here); the save loop is driven in process where a failure must
be forced.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from rotator.core.models import Account, AccountsFile
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.store import file as storage
from rotator.store.file import FileStore
from rotator.store.lock import DirLock, LockTimeout
from rotator.sync.save_loop import PoolSync
from testbed.fake_kimi import MESSAGES_PATH, FakeKimi
from testbed.processes import Proxy
from tests.support.accounts import fake_key
from tests.support.harness import FLUSH_INTERVAL_S
from tests.support.harness import accounts_on_disk, counts_on_disk, counts_seen, poll, run_cli

MSG = {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"x-api-key": "sk-kimi-placeholder", "User-Agent": "claude-cli/2.0.14 (external, cli)"}
PROBLEM_LOG = "cannot read the accounts file"
TOO_DEEP = "nested too deeply"


# -- helpers ---------------------------------------------------------------------------


def send(c: httpx.Client, proxy: Proxy) -> httpx.Response:
    return c.post(proxy.url + MESSAGES_PATH, json=MSG, headers=HEADERS)


def new_client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=30)


def caught_up(path: Path, fake: FakeKimi, keys: list[str], timeout: float = 3.0) -> bool:
    """Wait until the file's counts equal what the fake served `keys` (every key in the
    file, no other): the periodic saves have caught up."""
    return bool(poll(lambda: counts_on_disk(path) == counts_seen(fake, keys), timeout))


def swap_in(path: Path, data: bytes) -> None:
    """Replace the file's bytes in one step, under the writers' lock."""
    with storage._locked(path):
        tmp = path.with_name(path.name + ".test-swap")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


def raw_file(accounts: list[dict[str, object]], **top: object) -> bytes:
    return json.dumps({"version": 1, "accounts": accounts, "rotationStrategy": "round-robin", **top}).encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


DEEP_FILES = {
    "top-level": lambda keys: nested(5000).encode(),
    "in-a-field-1200": lambda keys: (
        '{"version": 1, "accounts": [{"key": "%s", "notes": %s}]}' % (keys[0], nested(1200))
    ).encode(),
    # Readable by Python's json, but deeper than the file can be written back.
    "in-a-field-400": lambda keys: (
        '{"version": 1, "accounts": [{"key": "%s", "notes": %s}]}' % (keys[0], nested(400))
    ).encode(),
}


# -- 5. deeply nested JSON ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", DEEP_FILES)
def test_cli_refuses_deeply_nested_json_in_one_line(kind, keys, accounts_path, write_accounts):
    write_accounts(keys)
    swap_in(accounts_path, DEEP_FILES[kind](keys))
    before = accounts_path.read_bytes()
    for args in (["list-keys"], ["add-key", fake_key("deep"), "New"], ["use-key", "0"]):
        done = run_cli(accounts_path, *args)
        assert done.returncode == 1, (args, done)
        lines = done.stderr.splitlines()
        assert len(lines) == 1, (args, done.stderr)
        assert str(accounts_path) in lines[0] and TOO_DEEP in lines[0], lines
        assert accounts_path.read_bytes() == before


@pytest.mark.parametrize("kind", ["top-level", "in-a-field-1200"])
def test_proxy_started_on_deeply_nested_json_explains_it_to_clients(
    kind, fake_kimi, keys, accounts_path, write_accounts, start_proxy
):
    write_accounts(keys)
    swap_in(accounts_path, DEEP_FILES[kind](keys))
    before = accounts_path.read_bytes()
    proxy = start_proxy(fake_kimi)  # before the fix: mitmdump exited at start
    assert poll(lambda: PROBLEM_LOG in proxy.output(), 3), proxy.output()
    with new_client() as c:
        answer = send(c, proxy)
        assert answer.status_code == 503
        message = answer.json()["error"]["message"]
        assert str(accounts_path) in message and TOO_DEEP in message, message
    assert fake_kimi.keys_seen() == []
    assert accounts_path.read_bytes() == before
    assert "Traceback" not in proxy.output()


def test_running_proxy_survives_deeply_nested_json_and_loses_no_count(
    fake_kimi, keys, accounts_path, write_accounts, start_proxy
):
    write_accounts(keys)
    proxy = start_proxy(fake_kimi)  # saves every 0.2 s
    with new_client() as c:
        assert all(send(c, proxy).status_code == 200 for _ in range(6))
        assert caught_up(accounts_path, fake_kimi, keys)
        good = accounts_path.read_bytes()
        swap_in(accounts_path, DEEP_FILES["in-a-field-1200"](keys))
        mark = len(proxy.output())
        assert poll(lambda: PROBLEM_LOG in proxy.output()[mark:], 3), proxy.output()
        for _ in range(30):  # over several save intervals
            assert send(c, proxy).status_code == 200
        swap_in(accounts_path, good)
        assert caught_up(accounts_path, fake_kimi, keys), (counts_on_disk(accounts_path), counts_seen(fake_kimi, keys))
    out = proxy.output()
    assert "Traceback" not in out and "RecursionError" not in out, out


# -- 7. a symlinked accounts file --------------------------------------------------------


@pytest.fixture
def linked(tmp_path: Path, accounts_path: Path) -> Path:
    """The accounts path as a symlink to a file in a dotfiles folder; returns the target."""
    target = tmp_path / "dotfiles" / "kimi-accounts.json"
    target.parent.mkdir()
    accounts_path.parent.mkdir(parents=True)
    accounts_path.symlink_to(target)
    return target


@pytest.mark.slow
def test_cli_writes_through_a_symlink_to_its_target(keys, accounts_path, linked):
    storage.write_accounts(linked, AccountsFile(accounts=[Account(key=keys[0], name="Old")]))
    done = run_cli(accounts_path, "add-key", keys[1], "New")
    assert done.returncode == 0, done
    assert accounts_path.is_symlink() and accounts_path.resolve() == linked
    assert [a["key"] for a in accounts_on_disk(linked)] == keys[:2]
    assert list(linked.parent.glob(".*.tmp")) == [] and list(accounts_path.parent.glob(".*.tmp")) == []


@pytest.mark.slow
def test_a_dangling_symlink_gets_its_target_created(keys, accounts_path, linked):
    assert not linked.exists()
    done = run_cli(accounts_path, "add-key", keys[0], "First")
    assert done.returncode == 0, done
    assert accounts_path.is_symlink() and accounts_path.resolve() == linked
    assert [a["key"] for a in accounts_on_disk(linked)] == keys[:1]


@pytest.mark.slow
def test_a_symlink_into_a_missing_folder_is_refused_and_left_alone(keys, tmp_path, accounts_path):
    accounts_path.parent.mkdir(parents=True)
    target = tmp_path / "not-cloned-yet" / "kimi-accounts.json"
    accounts_path.symlink_to(target)
    done = run_cli(accounts_path, "add-key", keys[0], "First")
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and str(accounts_path) in lines[0] and "symbolic link" in lines[0], lines
    assert accounts_path.is_symlink() and os.readlink(accounts_path) == str(target)
    assert not target.parent.exists()


def test_proxy_counts_go_to_the_symlinks_target(fake_kimi, keys, accounts_path, linked, start_proxy):
    storage.write_accounts(linked, AccountsFile(accounts=[Account(key=k) for k in keys], rotation_strategy="round-robin"))
    proxy = start_proxy(fake_kimi)
    with new_client() as c:
        assert all(send(c, proxy).status_code == 200 for _ in range(9))
        assert caught_up(linked, fake_kimi, keys), (counts_on_disk(linked), proxy.output())
        assert run_cli(accounts_path, "add-key", fake_key("linked-new"), "New").returncode == 0
        assert poll(lambda: "1 added" in proxy.output(), 3), proxy.output()
        assert all(send(c, proxy).status_code == 200 for _ in range(4))
        assert caught_up(linked, fake_kimi, [*keys, fake_key("linked-new")])
    proxy.stop()
    assert accounts_path.is_symlink() and accounts_path.resolve() == linked
    assert counts_on_disk(linked) == counts_seen(fake_kimi, [*keys, fake_key("linked-new")])


def test_the_lock_is_shared_by_the_link_and_its_target(keys, accounts_path, linked):
    # Two writers, one through the link and one through the real path, must not both
    # read the same old state: their changes would overwrite each other.
    storage.write_accounts(linked, AccountsFile(accounts=[Account(key=keys[0])]))
    with storage._locked(linked):
        lock_dir = DirLock(linked.with_name(linked.name + ".lock"), timeout_s=0)
        with pytest.raises(LockTimeout):
            lock_dir.acquire()
        done: list[AccountsFile] = []
        writer = threading.Thread(
            target=lambda: done.append(storage.update_accounts(
                accounts_path, lambda s: s.accounts.append(Account(key=keys[1])) or s))
        )
        writer.start()
        writer.join(0.5)
        assert writer.is_alive(), "a write through the link did not wait for the target's lock"
    writer.join(15)
    assert [a["key"] for a in accounts_on_disk(linked)] == keys[:2]


# -- 9. duplicate keys --------------------------------------------------------------------


def test_a_duplicate_key_is_one_key_counted_once_and_said_once(fake_kimi, keys, accounts_path, start_proxy):
    a, b = keys[:2]
    accounts_path.parent.mkdir(parents=True)
    accounts_path.write_bytes(raw_file([{"key": a, "name": "A"}, {"key": b, "name": "B"},
                                        {"key": a, "name": "A again", "totalRequests": 5}]))

    def entries() -> list[tuple[str, int, int]]:
        """(key, totals) entry by entry: counts_on_disk has one per key, and a is listed twice."""
        return [(e["key"], e.get("totalRequests", 0), e.get("successfulRequests", 0))
                for e in accounts_on_disk(accounts_path)]

    def first_entries_caught_up() -> bool:  # the proxy counts on a's first entry
        seen = counts_seen(fake_kimi, [a, b])
        return entries()[:2] == [(a, *seen[a]), (b, *seen[b])]

    proxy = start_proxy(fake_kimi)
    with new_client() as c:
        assert all(send(c, proxy).status_code == 200 for _ in range(10))
        assert poll(first_entries_caught_up, 3), (entries(), fake_kimi.count_by_key())
        # The window under test: three more saves, in which the note must not be said again.
        time.sleep(3 * FLUSH_INTERVAL_S)
    proxy.stop()
    assert fake_kimi.count_by_key() == {a: 5, b: 5}  # one key, one turn each
    assert entries() == [(a, 5, 5), (b, 5, 5), (a, 5, 0)]  # the duplicate kept, untouched
    out = proxy.output()
    assert out.count("listed 2 times") == 1, out


def test_list_keys_can_say_which_entries_are_duplicates(keys, tmp_path):
    path = tmp_path / "kimi-accounts.json"
    path.write_bytes(raw_file([{"key": keys[0]}, {"key": keys[1]}, {"key": keys[0]}, {"key": keys[0]}]))
    from rotator.core import oddities

    state = storage.read_accounts(path)
    notes = oddities.notes(state)
    assert len(notes) == 1, notes
    assert "[0]" in notes[0] and "[2]" in notes[0] and "[3]" in notes[0] and keys[0] not in notes[0]
    assert "remove-key 3" in notes[0]  # the last one first, so the other index stays right


def test_list_keys_warns_about_duplicates_and_leaves_them(keys, tmp_path):
    path = tmp_path / "kimi-accounts.json"
    raw = raw_file([{"key": keys[0], "name": "A"}, {"key": keys[1], "name": "B"}, {"key": keys[0], "name": "A again"}])
    path.write_bytes(raw)
    path.chmod(0o600)
    listed = run_cli(path, "list-keys", in_process=True)
    assert listed.returncode == 0, listed.stderr
    warnings = [line for line in listed.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, listed.stderr
    assert "listed 2 times ([0], [2])" in warnings[0] and "remove-key 2" in warnings[0]
    assert keys[0] not in listed.stderr + listed.stdout
    assert path.read_bytes() == raw  # the user's entries stay as they are


# -- 11. an unreadable file stays unreadable --------------------------------------------------


def test_proxy_on_a_truncated_file_never_calls_it_readable_again(fake_kimi, keys, accounts_path, write_accounts,
                                                                start_proxy):
    write_accounts(keys)
    good = accounts_path.read_bytes()
    swap_in(accounts_path, good[: len(good) // 2])
    proxy = start_proxy(fake_kimi, options={"kimi_flush_interval": "0.2"})
    assert poll(lambda: PROBLEM_LOG in proxy.output(), 3), proxy.output()
    start = time.monotonic()
    with new_client() as c:
        # Over two save intervals, measured by the saves' own effect: none.
        assert not poll(lambda: "readable again" in proxy.output(), 0.7)
        assert time.monotonic() - start > 0.4
        answer = send(c, proxy)
    assert answer.status_code == 503
    message = answer.json()["error"]["message"]
    assert "not valid JSON" in message and str(accounts_path) in message, message
    assert "add-key" not in message
    assert proxy.output().count(PROBLEM_LOG) == 1


# -- 12. activeIndex out of range, write and lock failures --------------------------------


@pytest.mark.slow
def test_active_index_out_of_range_is_key_0_and_is_said(keys, accounts_path):
    accounts_path.parent.mkdir(parents=True)
    accounts_path.write_bytes(raw_file([{"key": k, "name": f"K{i}"} for i, k in enumerate(keys)], activeIndex=7))
    before = accounts_path.read_bytes()
    listed = run_cli(accounts_path, "list-keys", "--json")
    assert listed.returncode == 0, listed
    assert json.loads(listed.stdout)["activeIndex"] == 0
    text = run_cli(accounts_path, "list-keys").stdout
    assert "● [0]" in text, text
    assert accounts_path.read_bytes() == before  # only read: the user's value stays
    from rotator.core import oddities

    state = storage.read_accounts(accounts_path)
    assert any("activeIndex 7" in note and "[0]" in note for note in oddities.notes(state))
    assert run_cli(accounts_path, "rotate").returncode == 0  # moves on from what was shown
    assert json.loads(accounts_path.read_text())["activeIndex"] == 1


def test_proxy_says_once_that_active_index_is_out_of_range(fake_kimi, keys, accounts_path, start_proxy):
    accounts_path.parent.mkdir(parents=True)
    accounts_path.write_bytes(raw_file([{"key": k} for k in keys], activeIndex=9, rotationStrategy="sticky"))
    proxy = start_proxy(fake_kimi)
    with new_client() as c:
        assert all(send(c, proxy).status_code == 200 for _ in range(3))
    assert caught_up(accounts_path, fake_kimi, keys)
    assert fake_kimi.count_by_key() == {keys[0]: 3}
    assert proxy.output().count("activeIndex 9") == 1, proxy.output()


def _store_with_changes(tmp_path: Path) -> tuple[FileStore, KeyPool, PoolSync]:
    path = tmp_path / "kimi-accounts.json"
    storage.write_accounts(path, AccountsFile(accounts=[Account(key=fake_key("w0"))]))
    store = FileStore(path)
    pool = KeyPool(AccountsFile())
    sync = PoolSync(store, pool, 1.0)
    assert sync.load() is not None
    lease = pool.acquire(pool.clock.now_ms())
    assert isinstance(lease, Lease)
    return store, pool, sync


async def test_a_full_disk_is_reported_as_a_write_failure(tmp_path, monkeypatch, caplog):
    store, pool, sync = _store_with_changes(tmp_path)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", no_space)
    with caplog.at_level(logging.INFO):
        await sync.save_once()
    assert "cannot write the accounts file" in caplog.text and "No space left" in caplog.text, caplog.text
    assert "cannot read" not in caplog.text
    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        await sync.save_once()
    assert storage.read_accounts(store.path).accounts[0].total_requests == 1  # kept, then saved
    assert "works again" in caplog.text and "readable again" not in caplog.text


async def test_a_held_lock_is_reported_as_a_lock_timeout(tmp_path, monkeypatch, caplog):
    store, pool, sync = _store_with_changes(tmp_path)
    monkeypatch.setattr(storage, "LOCK_TIMEOUT_S", 0.2)
    holder = DirLock(store.path.with_name(store.path.name + ".lock"))
    done = threading.Event()
    taken = threading.Event()

    def hold() -> None:
        with holder:
            taken.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    taken.wait(5)
    try:
        with caplog.at_level(logging.INFO):
            await sync.save_once()
    finally:
        done.set()
        thread.join(5)
    assert "cannot lock the accounts file" in caplog.text and "held its lock" in caplog.text, caplog.text
    assert "cannot read" not in caplog.text
    await sync.save_once()
    assert storage.read_accounts(store.path).accounts[0].total_requests == 1


# -- a key no header may carry -------------------------------------------------------------


def test_a_key_with_a_line_break_or_spaces_is_never_sent(fake_kimi, keys, accounts_path, start_proxy):
    good = keys[0]
    injected = keys[1] + "\r\nx-injected: yes"
    padded = " " + keys[2] + " "
    accounts_path.parent.mkdir(parents=True)
    accounts_path.write_bytes(raw_file([{"key": injected, "name": "Pasted"}, {"key": padded, "name": "Padded"},
                                        {"key": good, "name": "Good"}]))
    accounts_path.chmod(0o600)
    proxy = start_proxy(fake_kimi)
    with new_client() as c:
        assert all(send(c, proxy).status_code == 200 for _ in range(6))
    proxy.stop()
    assert fake_kimi.keys_seen() == [good] * 6
    assert not any("x-injected" in {k.lower() for k in r.headers} for r in fake_kimi.message_requests())
    out = proxy.output()
    assert out.count("is never used: its key holds spaces") == 2, out
    assert keys[1] not in out and keys[2] not in out
    listed = run_cli(accounts_path, "list-keys", in_process=True)
    warnings = [line for line in listed.stderr.splitlines() if "never used" in line]
    assert [w.split("key [")[1][:1] for w in warnings] == ["0", "1"], listed.stderr
