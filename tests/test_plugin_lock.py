"""One lock for both tools (issue 10, item 3): kimi-rotator and the TypeScript plugin,
which locks with the npm package proper-lockfile, exclude each other on one accounts file.

The plugin's side is the real proper-lockfile v4 under Node, installed with npm into a
temporary folder once per session: these tests fail (never skip) without node and npm.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rotator.core.models import Account, AccountsFile
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.store import file as storage
from rotator.store.file import FileStore
from rotator.store.lock import STALE_S, Found, judge
from rotator.sync.save_loop import PoolSync
from testbed.processes import REPO_ROOT
from tests.support.accounts import fake_key
from tests.support.harness import accounts_on_disk, run_cli
from tests.support.node import npm_install

# Takes the lock as the plugin's storage.ts does (stale 5000 ms, 3 retries) unless the
# options say otherwise; reads the file once locked, waits HOLD_MS, adds KEY (if given),
# writes the file back and releases: the plugin's own read-modify-write. IN_PLACE leaves
# the file empty while it waits: the plugin writes in place (truncate, then write).
PLUGIN_SCRIPT = r"""
const lockfile = require('proper-lockfile');
const fs = require('fs');
const [file, holdMs, key, extra, inPlace] = process.argv.slice(2);
const options = Object.assign({ stale: 5000, retries: 3 }, JSON.parse(extra || '{}'));
(async () => {
  const release = await lockfile.lock(file, options);
  console.log('locked');
  const config = JSON.parse(fs.readFileSync(file, 'utf-8'));
  if (inPlace) fs.writeFileSync(file, '');  // writeFile's truncate, drawn out
  await new Promise((done) => setTimeout(done, Number(holdMs)));
  if (key) {
    config.accounts.push({ key, name: 'From the plugin', addedAt: Date.now(), lastUsed: Date.now() });
    fs.writeFileSync(file, JSON.stringify(config, null, 2), 'utf-8');
  }
  await release();
  console.log('released');
})().catch((e) => { console.error(`${e.code}: ${e.message}`); process.exit(1); });
"""


@pytest.fixture(scope="session")
def plugin_lock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with proper-lockfile@4 installed and the plugin's script in it."""
    folder = npm_install(tmp_path_factory, "proper-lockfile@4")
    (folder / "plugin_lock.js").write_text(PLUGIN_SCRIPT)
    return folder


def start_plugin(folder: Path, accounts: Path, hold_ms: int, key: str = "", *,
                 in_place: bool = False, **options: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["node", str(folder / "plugin_lock.js"), str(accounts), str(hold_ms), key,
         json.dumps(options), "in-place" if in_place else ""],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_locked(plugin: subprocess.Popen[str]) -> None:
    assert plugin.stdout is not None
    line = plugin.stdout.readline()
    assert line.strip() == "locked", (line, plugin.stderr.read() if plugin.stderr else "")


def finish(plugin: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = plugin.communicate(timeout=30)
    return plugin.returncode, out + err


def keys_on_disk(path: Path) -> list[str]:
    return [account["key"] for account in accounts_on_disk(path)]


@pytest.fixture
def accounts(accounts_path: Path) -> Path:
    storage.write_accounts(accounts_path, AccountsFile(accounts=[Account(key=fake_key("first"))]))
    return accounts_path


def lock_of(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


# -- the two tools exclude each other -------------------------------------------------


@pytest.mark.slow
def test_add_key_waits_while_the_plugin_holds_the_lock(plugin_lock, accounts):
    plugin = start_plugin(plugin_lock, accounts, 1000, fake_key("plugin"))
    wait_until_locked(plugin)
    added = run_cli(accounts, "add-key", fake_key("ours"), "Ours")
    code, output = finish(plugin)
    assert code == 0, output
    assert added.returncode == 0, added.stderr
    # Had add-key written while the plugin held the lock, the plugin's write (of what it
    # read before) would have dropped our key.
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("plugin"), fake_key("ours")]
    assert not lock_of(accounts).exists()


@pytest.mark.slow
@pytest.mark.parametrize("verb", [["list-keys", "--json"], ["add-key", fake_key("ours"), "Ours"]])
def test_a_file_the_plugin_is_rewriting_is_read_once_it_is_done(plugin_lock, accounts, verb):
    plugin = start_plugin(plugin_lock, accounts, 1000, fake_key("plugin"), in_place=True)
    wait_until_locked(plugin)
    done = run_cli(accounts, *verb)
    code, output = finish(plugin)
    assert code == 0, output
    assert done.returncode == 0, done.stderr  # not "not valid JSON"
    if verb[0] == "list-keys":  # what the plugin wrote, not what it had emptied
        assert [a["name"] for a in json.loads(done.stdout)["accounts"]] == ["", "From the plugin"]
        assert keys_on_disk(accounts) == [fake_key("first"), fake_key("plugin")]
    else:
        assert keys_on_disk(accounts) == [fake_key("first"), fake_key("plugin"), fake_key("ours")]


@pytest.mark.slow
def test_through_a_symlink_both_tools_lock_beside_its_target(plugin_lock, accounts, tmp_path):
    # A dotfile manager's link: proper-lockfile resolves it (realpath) as we do.
    link = tmp_path / "dotfiles-link.json"
    link.symlink_to(accounts)
    plugin = start_plugin(plugin_lock, link, 1000, fake_key("plugin"))
    wait_until_locked(plugin)
    assert lock_of(accounts).is_dir() and not lock_of(link).exists()
    added = run_cli(link, "add-key", fake_key("ours"), "Ours")
    code, output = finish(plugin)
    assert code == 0, output
    assert added.returncode == 0, added.stderr
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("plugin"), fake_key("ours")]
    assert link.is_symlink()


@pytest.mark.slow
async def test_a_proxy_save_waits_for_the_plugin_and_keeps_both_changes(plugin_lock, accounts):
    sync = PoolSync(FileStore(accounts), pool := KeyPool(AccountsFile()), 1.0)
    assert sync.load() is not None
    assert isinstance(pool.acquire(pool.clock.now_ms()), Lease)  # one request to count
    plugin = start_plugin(plugin_lock, accounts, 1000, fake_key("plugin"))
    wait_until_locked(plugin)
    await sync.save_once()  # the proxy's periodic save, in its worker thread
    code, output = finish(plugin)
    assert code == 0, output
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("plugin")]
    assert storage.read_accounts(accounts).accounts[0].total_requests == 1


@pytest.mark.slow
def test_the_plugin_waits_while_kimi_rotator_holds_the_lock(plugin_lock, accounts):
    # Held for 3 s against the plugin's shortest stale time (proper-lockfile allows 2 s,
    # polling every 100 ms): only our refreshing the lock keeps it from a takeover.
    inside = threading.Event()

    def slow_change(state: AccountsFile) -> AccountsFile:
        inside.set()
        time.sleep(3.0)
        state.accounts.append(Account(key=fake_key("ours"), name="Ours"))
        return state

    writer = threading.Thread(target=storage.update_accounts, args=(accounts, slow_change))
    writer.start()
    assert inside.wait(5)
    plugin = start_plugin(plugin_lock, accounts, 0, fake_key("plugin"), stale=2000,
                          retries={"retries": 100, "minTimeout": 100, "maxTimeout": 100, "factor": 1})
    writer.join(10)
    code, output = finish(plugin)
    assert code == 0, output
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("ours"), fake_key("plugin")]
    assert not lock_of(accounts).exists()


@pytest.mark.slow
def test_the_plugin_can_lock_right_after_a_kimi_rotator_write(plugin_lock, accounts):
    assert run_cli(accounts, "add-key", fake_key("ours"), "Ours").returncode == 0
    plugin = start_plugin(plugin_lock, accounts, 0, fake_key("plugin"), retries=0)
    code, output = finish(plugin)
    assert code == 0, output  # not "Lock file is already being held"
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("ours"), fake_key("plugin")]


# -- abandoned locks ----------------------------------------------------------------


@pytest.mark.slow
def test_a_stale_lock_directory_is_taken_over(accounts):
    lock = lock_of(accounts)
    lock.mkdir()
    old = time.time() - 60
    os.utime(lock, (old, old))
    started = time.monotonic()
    added = run_cli(accounts, "add-key", fake_key("ours"), "Ours")
    assert added.returncode == 0, added.stderr
    assert time.monotonic() - started < storage.LOCK_TIMEOUT_S
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("ours")]
    assert not lock.exists()


def test_a_fresh_lock_directory_is_not_taken_over(accounts, monkeypatch):
    lock = lock_of(accounts)
    lock.mkdir()  # as the plugin holds it: mtime now
    monkeypatch.setattr(storage, "LOCK_TIMEOUT_S", 0.3)
    before = accounts.read_bytes()
    added = run_cli(accounts, "add-key", fake_key("ours"), "Ours", in_process=True)
    assert added.returncode != 0
    assert "another process has held its lock for over 0.3 s" in added.stderr, added.stderr
    assert accounts.read_bytes() == before
    assert lock.is_dir()


def test_something_else_at_the_lock_path_is_named_and_left_alone(accounts, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lock_of(accounts).symlink_to(elsewhere)
    before = accounts.read_bytes()
    added = run_cli(accounts, "add-key", fake_key("ours"), "Ours", in_process=True)
    assert added.returncode != 0
    assert f"cannot take its lock ({lock_of(accounts)} is neither a lock directory" in added.stderr
    assert accounts.read_bytes() == before
    assert lock_of(accounts).is_symlink() and elsewhere.is_dir()


@pytest.mark.slow
def test_a_kimi_rotator_killed_while_holding_the_lock_holds_up_nobody(accounts):
    # Killed mid-save (SIGKILL, the OOM killer): its lock directory stays, fresh, but a
    # kimi-rotator does not wait the 5 s stale time for it, as it never did with flock.
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, sys\n"
         "from pathlib import Path\n"
         "from rotator.store import file as storage\n"
         "with storage._locked(Path(sys.argv[1])):\n"
         "    os.kill(os.getpid(), signal.SIGKILL)\n", str(accounts)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert lock_of(accounts).is_dir()
    started = time.monotonic()
    added = run_cli(accounts, "add-key", fake_key("ours"), "Ours", in_process=True)
    assert added.returncode == 0, added.stderr
    assert time.monotonic() - started < 1.0
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("ours")]
    assert not lock_of(accounts).exists()


def test_a_kimi_rotator_killed_right_after_making_the_lock_holds_up_nobody(accounts):
    # Killed between mkdir and its flock: the directory it leaves is already marked (mkdir
    # makes it so), nobody is making one any more, so it is a dead holder's.
    lock = lock_of(accounts)
    os.mkdir(lock, 0o700 | stat.S_ISVTX)
    started = time.monotonic()
    added = run_cli(accounts, "add-key", fake_key("ours"), "Ours", in_process=True)
    assert added.returncode == 0, added.stderr
    assert time.monotonic() - started < 1.0
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("ours")]


def test_a_lock_directory_being_made_is_not_taken_over(accounts):
    # Between another kimi-rotator's mkdir and its flock (it holds the folder's flock
    # meanwhile), its marked, not yet flocked directory is held, not a dead one's.
    from rotator.store.lock import DirLock, LockTimeout, _creating

    lock = lock_of(accounts)
    with _creating(lock):
        os.mkdir(lock, 0o700 | stat.S_ISVTX)
        with pytest.raises(LockTimeout):
            DirLock(lock, timeout_s=0.3).acquire()
    assert lock.is_dir()


def test_a_lock_taken_over_while_held_writes_nothing(accounts):
    lock = lock_of(accounts)

    def taken_over(state: AccountsFile) -> AccountsFile:
        os.rmdir(lock)  # what a process that judged our lock stale does
        lock.mkdir()
        state.accounts.append(Account(key=fake_key("ours")))
        return state

    before = accounts.read_bytes()
    with pytest.raises(storage.AccountsFileError, match="lost its lock"):
        storage.update_accounts(accounts, taken_over)
    assert accounts.read_bytes() == before
    assert lock.is_dir(), "the new holder's lock was removed"


def test_what_is_at_the_lock_path_is_judged_as_proper_lockfile_does(tmp_path):
    now = time.time()
    folder = tmp_path / "x.lock"
    folder.mkdir()
    assert judge(None, now, STALE_S) is Found.NOTHING
    assert judge(os.stat(folder), now, STALE_S) is Found.HELD
    assert judge(os.stat(folder), now + STALE_S + 1, STALE_S) is Found.STALE
    plain = tmp_path / "y.lock"
    plain.write_bytes(b"")
    assert judge(os.lstat(plain), now + 3600, STALE_S) is Found.OLD_FILE
    (tmp_path / "z.lock").symlink_to(folder)
    assert judge(os.lstat(tmp_path / "z.lock"), now, STALE_S) is Found.OTHER


# -- a lock file left by an older kimi-rotator -----------------------------------------


@pytest.fixture
def old_lock_file(accounts: Path) -> Path:
    """The regular file older kimi-rotators (filelock) left beside the file."""
    lock = lock_of(accounts)
    lock.write_bytes(b"")
    return lock


@pytest.fixture
def old_holder(old_lock_file: Path) -> Iterator[int]:
    """An older kimi-rotator in the middle of a save: the old lock file flock()ed."""
    fd = os.open(old_lock_file, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.slow
def test_an_unused_old_lock_file_is_removed(plugin_lock, accounts, old_lock_file):
    added = run_cli(accounts, "add-key", fake_key("ours"), "Ours")
    assert added.returncode == 0, added.stderr
    assert not old_lock_file.exists()
    plugin = start_plugin(plugin_lock, accounts, 0, fake_key("plugin"), retries=0)
    code, output = finish(plugin)
    assert code == 0, output
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("ours"), fake_key("plugin")]


@pytest.mark.slow
def test_an_old_lock_file_in_use_is_waited_for(plugin_lock, accounts, old_holder):
    def old_save_then_unlock() -> None:
        time.sleep(1.0)
        storage.write_accounts(accounts, AccountsFile(
            accounts=[Account(key=fake_key("first")), Account(key=fake_key("old"))]))
        fcntl.flock(old_holder, fcntl.LOCK_UN)

    old = threading.Thread(target=old_save_then_unlock)
    old.start()
    added = run_cli(accounts, "add-key", fake_key("ours"), "Ours")
    old.join(5)
    assert added.returncode == 0, added.stderr
    assert keys_on_disk(accounts) == [fake_key("first"), fake_key("old"), fake_key("ours")]
    plugin = start_plugin(plugin_lock, accounts, 0, fake_key("plugin"), retries=0)
    code, output = finish(plugin)
    assert code == 0, output


def test_an_old_lock_file_held_too_long_names_the_older_kimi_rotator(accounts, old_holder,
                                                                    monkeypatch):
    monkeypatch.setattr(storage, "LOCK_TIMEOUT_S", 0.3)
    before = accounts.read_bytes()
    added = run_cli(accounts, "add-key", fake_key("ours"), "Ours", in_process=True)
    assert added.returncode != 0
    lines = added.stderr.strip().splitlines()
    assert len(lines) == 1, added.stderr
    assert "another process has held its lock for over 0.3 s" in lines[0]
    assert "older kimi-rotator" in lines[0] and str(lock_of(accounts)) in lines[0]
    assert accounts.read_bytes() == before
