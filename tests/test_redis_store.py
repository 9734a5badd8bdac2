"""The Redis store against a real redis-server: read/edit/load/sync, exact counts under
racing writers, corrupt values left alone, errors quick and with the password masked."""

from __future__ import annotations

import threading
import time

import pytest

from rotator.admin import ops
from rotator.core import merge
from rotator.store import PoolLost, StoreError, open_store
from rotator.store.file import FileStore
from rotator.store.redis_store import RESTORED_VERSION_STEP, RedisStore
from rotator.store.urls import is_private_url, masked_url
from testbed.redis_server import RedisServer, free_port

KEY_A = "sk-kimi-" + "a" * 40
KEY_B = "sk-kimi-" + "b" * 40


def _counts(n: int, key: str = KEY_A) -> merge.PoolChange:
    change = merge.PoolChange()
    change.for_key(key).add("total_requests", n, int(time.time() * 1000))
    return change


def test_empty_pool_then_edit_and_read(redis_server):
    store = RedisStore(redis_server.url)
    assert store.load().accounts == []
    ops.run(store, ops.add_key(KEY_A, "A", 1))
    assert [a.key for a in RedisStore(redis_server.url).read().accounts] == [KEY_A]
    assert redis_server.command("GET", "kimi-rotator:version") == b"1"


def test_sync_reports_other_writers_only(redis_server):
    mine, other = RedisStore(redis_server.url), RedisStore(redis_server.url)
    ops.run(mine, ops.add_key(KEY_A, "A", 1))
    mine.load()
    assert mine.sync(merge.PoolChange()) is None
    ops.run(other, ops.add_key(KEY_B, "B", 2))
    seen = mine.sync(merge.PoolChange())
    assert seen is not None and len(seen.accounts) == 2
    assert mine.sync(merge.PoolChange()) is None


def test_racing_syncs_add_counts_exactly(redis_server):
    ops.run(RedisStore(redis_server.url), ops.add_key(KEY_A, "A", 1))
    stores = [RedisStore(redis_server.url) for _ in range(4)]

    def hammer(store: RedisStore) -> None:
        store.load()
        for _ in range(50):
            store.sync(_counts(1))

    threads = [threading.Thread(target=hammer, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert RedisStore(redis_server.url).read().accounts[0].total_requests == 200


def test_a_persons_edit_wins_by_time(redis_server):
    store = RedisStore(redis_server.url)
    ops.run(store, ops.add_key(KEY_A, "A", 1))
    store.load()
    stale = merge.PoolChange()
    stale.move_active(KEY_A, 1)  # made before the person's choice below
    ops.run(store, ops.add_key(KEY_B, "B", 2))
    ops.run(store, ops.use_key(1, int(time.time() * 1000)))
    state = store.sync(stale)
    assert state is not None and state.active_index == 1


def test_corrupt_value_is_not_overwritten(redis_server):
    redis_server.command("SET", "kimi-rotator:accounts", "{not json")
    store = RedisStore(redis_server.url)
    with pytest.raises(StoreError, match="no readable pool"):
        store.read()
    with pytest.raises(StoreError):
        store.sync(_counts(1))
    with pytest.raises(StoreError):
        ops.run(store, ops.add_key(KEY_A, "A", 1))
    assert redis_server.command("GET", "kimi-rotator:accounts") == b"{not json"


def test_unreachable_is_a_quick_store_error():
    store = RedisStore(f"redis://user:hunter22@127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.load()
    assert time.monotonic() - started < 2
    assert "hunter22" not in str(caught.value)
    assert "redis://user:***@127.0.0.1" in str(caught.value)
    assert "hunter22" not in store.location


@pytest.mark.slow
def test_wrong_password_is_named_and_masked(tmp_path):
    srv = RedisServer(tmp_path, password="right-pass-123")
    srv.start()
    try:
        assert RedisStore(srv.url).read().accounts == []
        bad = RedisStore(f"redis://default:wrong-pass-456@127.0.0.1:{srv.port}/0")
        with pytest.raises(StoreError) as caught:
            bad.read()
        assert "wrong-pass-456" not in str(caught.value)
        assert "***" in str(caught.value)
    finally:
        srv.stop()


def test_stopped_then_back(redis_server):
    store = RedisStore(redis_server.url)
    ops.run(store, ops.add_key(KEY_A, "A", 1))
    store.load()
    redis_server.stop()
    with pytest.raises(StoreError):
        store.sync(_counts(3))
    redis_server.start()  # persistence is off: the pool is gone, the store still works
    with pytest.raises(PoolLost):  # ... and knows the pool it saw is gone (a proxy restores it)
        store.sync(_counts(3))
    ops.run(RedisStore(redis_server.url), ops.add_key(KEY_A, "A", 1))  # the CLI's own store
    assert store.sync(_counts(3)).accounts[0].total_requests == 3


def test_prefix_isolation(redis_server):
    team_a, team_b = RedisStore(redis_server.url, "a:"), RedisStore(redis_server.url, "b:")
    ops.run(team_a, ops.add_key(KEY_A, "A", 1))
    assert team_b.read().accounts == []
    assert [a.key for a in team_a.read().accounts] == [KEY_A]


def test_open_store_and_urls(tmp_path):
    assert isinstance(open_store("", tmp_path / "f.json"), FileStore)
    assert isinstance(open_store(None, tmp_path / "f.json"), FileStore)
    assert isinstance(open_store("rediss://h:6380/0", tmp_path), RedisStore)
    with pytest.raises(StoreError, match="not a store"):
        open_store("http://u:pw@h/", tmp_path)
    assert masked_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert is_private_url("redis://127.0.0.1:1/0") and is_private_url("rediss://example.com")
    assert not is_private_url("redis://example.com:6379/0")


def test_cli_verbs_and_import_export_through_redis(redis_server, tmp_path, monkeypatch, capsys):
    import rotator.cli.main as cli

    plain = tmp_path / "accounts.json"
    assert cli.main(["--accounts", str(plain), "add-key", KEY_A, "A"]) == 0
    assert cli.main(["--store", redis_server.url, "import-keys", str(plain)]) == 0
    assert [a.key for a in RedisStore(redis_server.url).read().accounts] == [KEY_A]
    monkeypatch.setenv("KIMI_ROTATOR_STORE", redis_server.url)
    assert cli.main(["add-key", KEY_B, "B"]) == 0
    assert cli.main(["--store-prefix", "other:", "list-keys"]) == 0
    assert "No Kimi API keys" in capsys.readouterr().out
    assert len(RedisStore(redis_server.url).read().accounts) == 2
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("a-long-password\n"))
    backup = tmp_path / "out.enc"
    assert cli.main(["export-keys", str(backup)]) == 0 and backup.exists()
    assert cli.main(["--store", f"redis://u:sekrit99@127.0.0.1:{free_port()}/0", "list-keys"]) == 1
    err = capsys.readouterr().err
    assert "unreachable" in err and "sekrit99" not in err


def test_the_proxys_log_names_the_team_store_not_a_file(caplog):
    import logging

    from rotator.core.models import AccountsFile
    from rotator.pool.key_pool import KeyPool
    from rotator.sync.save_loop import PoolSync

    store = RedisStore(f"redis://:sekrit99@127.0.0.1:{free_port()}/0", "kimi-rotator:")
    caplog.set_level(logging.INFO)
    assert PoolSync(store, KeyPool(AccountsFile()), 1.0).load() is None
    assert "cannot read the team store redis://:***@127.0.0.1:" in caplog.text, caplog.text
    assert "accounts file" not in caplog.text and "sekrit99" not in caplog.text


@pytest.mark.slow
def test_without_the_redis_client_the_proxy_and_cli_still_work_and_a_team_store_says_what_to_install(tmp_path):
    """redis is the optional `team` extra: the README's install (no extras) must start the proxy."""
    import subprocess
    import sys

    script = f"""
import sys
sys.modules["redis"] = None  # as if the team extra were not installed
import rotator.proxy.addon, rotator.cli.main
from rotator.store import open_store, StoreError
print(type(open_store("", {str(tmp_path / "a.json")!r})).__name__)
try:
    open_store("redis://:sekrit99@127.0.0.1:6379/0", "unused")
except StoreError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "FileStore",
        "redis://:***@127.0.0.1:6379/0: a team store needs the redis client (redis is not installed):"
        " pip install 'kimi-rotator[team]'",
    ], out.stdout


def _proxy_store(redis_server: RedisServer) -> RedisStore:
    """Two keys added as a person would, and a proxy's store that has read them."""
    for key, name in ((KEY_A, "A"), (KEY_B, "B")):
        ops.run(RedisStore(redis_server.url), ops.add_key(key, name, 1))
    store = RedisStore(redis_server.url)
    assert len(store.load().accounts) == 2
    return store


def test_a_pool_the_server_lost_is_told_apart_from_one_a_person_emptied(redis_server):
    store = _proxy_store(redis_server)
    for _ in range(2):  # a person empties the pool: a newer version, an empty pool
        ops.run(RedisStore(redis_server.url), ops.remove_key(0))
    assert redis_server.command("GET", "kimi-rotator:accounts") is not None
    emptied = store.sync(_counts(1))
    assert emptied is not None and emptied.accounts == []

    store = _proxy_store(redis_server)
    redis_server.command("FLUSHALL")
    for lost in (lambda: store.sync(_counts(1)), lambda: store.sync(merge.PoolChange()), store.read,
                 lambda: ops.run(store, ops.add_key(KEY_A, "A", 1))):
        with pytest.raises(PoolLost, match=rf"^{redis_server.url} lost the pool \(no kimi-rotator:accounts"):
            lost()
    assert redis_server.command("KEYS", "*") == []  # nothing written


def test_an_older_snapshot_is_a_lost_pool(redis_server):
    store = _proxy_store(redis_server)
    redis_server.command("SAVE")  # the snapshot the server comes back with
    store.sync(_counts(5))
    store.sync(_counts(5))
    redis_server.stop()  # persistence is off: nothing saved since the snapshot
    redis_server.start()
    assert redis_server.command("GET", "kimi-rotator:version") == b"2"
    with pytest.raises(PoolLost, match="an older kimi-rotator:accounts, kimi-rotator:version 2 where it was 4"):
        store.sync(_counts(1))


def test_a_restored_pool_is_ahead_of_every_view_of_the_lost_one(redis_server):
    first = _proxy_store(redis_server)
    memory = first.read()
    memory.accounts[0].total_requests = 7  # its own counts, not saved yet
    later = RedisStore(redis_server.url)
    later.load()
    later.sync(_counts(2, KEY_B))  # a version `first` has not seen (its counts go with the data)
    redis_server.command("FLUSHALL")
    with pytest.raises(PoolLost):
        first.sync(_counts(1))
    restored = first.restore(lambda stored: memory)
    assert restored is memory
    assert int(redis_server.command("GET", "kimi-rotator:version")) == 2 + RESTORED_VERSION_STEP
    # The other proxy saw a later version of the lost pool: it adds to the restored one.
    assert later.restore(lambda stored: pytest.fail("not lost any more")) is None
    state = later.sync(_counts(3, KEY_B))
    assert state is not None and [a.total_requests for a in state.accounts] == [7, 3]
    assert [a.total_requests for a in RedisStore(redis_server.url).read().accounts] == [7, 3]


def test_a_restore_leaves_an_unreadable_value_alone(redis_server):
    store = _proxy_store(redis_server)
    redis_server.command("FLUSHALL")
    redis_server.command("SET", "kimi-rotator:accounts", "{not json")
    with pytest.raises(StoreError, match="no readable pool"):
        store.restore(lambda stored: stored)
    assert redis_server.command("GET", "kimi-rotator:accounts") == b"{not json"
