"""The accounts file as a state store: where it is, reading it, and changing it safely.

Every writer (the CLI and each running proxy) changes the file the same way: take the
cross-process lock (rotator/store/lock.py: the one the OpenCode plugin takes too), read
the file, apply its change to what it read, write a temporary file beside it, fsync,
and rename it over the old one (rotator/store/safe_write.py). A crash leaves the old or the new
file whole, and a change made by another process between our reads is never lost.
A file that cannot be read is never written, nor one nested too deeply to write back.

A symlinked accounts file (dotfile managers link config files) is written through: the
temporary file, the rename and the lock are all beside the link's target, so the link
stays a link, the rename stays atomic, and every path to one file shares one lock.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import platformdirs
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from rotator.core import edit_stamps, merge
from rotator.core.clock import SYSTEM_CLOCK, Clock
from rotator.core.models import AccountsFile
from rotator.store import StoreError
from rotator.store.lock import DirLock, LockLost, LockTimeout
from rotator.store.safe_write import ensure_private_dir, write_private

ACCOUNTS_ENV = "KIMI_ROTATOR_ACCOUNTS"
ACCOUNTS_FILENAME = "kimi-accounts.json"
LOCK_TIMEOUT_S = 10.0
STALE_TEMP_AGE_S = 60.0
# Deeper JSON than this is refused on read: Python's json and pydantic's serialiser
# stop somewhere above it (a RecursionError, or a file that reads but cannot be saved).
MAX_DEPTH = 200
TOO_DEEP = f"nested too deeply (JSON arrays or objects more than {MAX_DEPTH} levels deep)"


class AccountsFileError(StoreError):
    """The accounts file can't be read or written; the message names file and problem."""

    def __init__(self, path: Path, problem: str, action: str = "read") -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
        self.action = action


class FileSignature(NamedTuple):
    """Enough of a stat result to notice that another process replaced the file."""

    inode: int
    size: int
    mtime_ns: int


def default_accounts_path() -> Path:
    override = os.environ.get(ACCOUNTS_ENV)
    if override:
        return Path(override).expanduser()
    return platform_accounts_path()


def platform_accounts_path() -> Path:
    """The accounts file with no option and no environment: the user config folder's."""
    return Path(platformdirs.user_config_dir("kimi-rotator")) / ACCOUNTS_FILENAME


def resolve_accounts_path(explicit: str | os.PathLike[str] | None) -> Path:
    return Path(explicit).expanduser() if explicit else default_accounts_path()


def file_signature(path: Path) -> FileSignature | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AccountsFileError(path, _os_problem(e)) from e
    return FileSignature(st.st_ino, st.st_size, st.st_mtime_ns)


def read_accounts(path: Path) -> AccountsFile:
    """The file's accounts; an empty pool if there is no file yet."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return AccountsFile()
    except OSError as e:
        raise AccountsFileError(path, _os_problem(e)) from e
    return parse_accounts(path, raw)


def parse_accounts(path: Path, raw: bytes) -> AccountsFile:
    try:
        return AccountsFile.model_validate_json(raw)  # the fast path, for good files
    except ValidationError:
        pass  # read it again the slow way, to say exactly what is wrong
    try:
        data = json.loads(raw)
    except RecursionError as e:
        raise AccountsFileError(path, TOO_DEEP) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AccountsFileError(path, f"not valid JSON ({e})") from e
    # The fast path refuses deep files itself (its limit is below MAX_DEPTH).
    if json_depth(data) > MAX_DEPTH:
        raise AccountsFileError(path, TOO_DEEP)
    if isinstance(data, dict) and "version" in data and data["version"] != 1:
        raise AccountsFileError(
            path, f"unsupported version {data['version']!r} (this kimi-rotator reads version 1)"
        )
    try:
        return AccountsFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise AccountsFileError(path, f"invalid accounts file at {where}: {first['msg']}") from e


def json_depth(value: object) -> int:
    """How deeply `value` (parsed JSON) nests arrays and objects; without recursion."""
    deepest = 0
    todo: list[tuple[object, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in item if isinstance(child, (list, dict)))
    return deepest


def write_target(path: Path) -> Path:
    """The file a write to `path` replaces: `path`, or the file its symlink points to
    (which need not exist yet: it is created, in a folder that must exist)."""
    if not path.is_symlink():
        return path
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise AccountsFileError(path, f"is a symbolic link that cannot be followed ({e})", "write") from e
    if not target.parent.is_dir():
        raise AccountsFileError(
            path, f"is a symbolic link to {target}, whose folder does not exist; create it or fix the link", "write"
        )
    return target


def write_accounts(path: Path, state: AccountsFile) -> None:
    """Replace the file atomically with `state` (mode 0600, its folder 0700)."""
    _write_bytes(path, _serialise(path, state).encode())


def _serialise(path: Path, state: AccountsFile) -> str:
    try:
        return state.to_json()
    except (PydanticSerializationError, ValueError, RecursionError) as e:
        # The file was read, so this is a bug or a value no JSON can hold: say so, write nothing.
        raise AccountsFileError(path, f"cannot be saved as JSON ({str(e).splitlines()[0]})", "write") from e


def _write_bytes(path: Path, data: bytes) -> None:
    target = write_target(path)
    try:
        ensure_private_dir(target.parent)
        write_private(target, data)
    except OSError as e:
        raise AccountsFileError(path, _os_problem(e), "write") from e


def update_accounts(path: Path, change: Callable[[AccountsFile], AccountsFile | None]) -> AccountsFile:
    """Read-modify-write under the cross-process lock.

    `change` gets the state as it is on disk now and returns the state to write (it may
    mutate and return its argument, or return None to write nothing). Returns the state
    now on disk. Raises AccountsFileError, in which case nothing was written.
    """
    return update_accounts_signed(path, change)[0]


def update_accounts_signed(
    path: Path, change: Callable[[AccountsFile], AccountsFile | None]
) -> tuple[AccountsFile, FileSignature | None]:
    """`update_accounts`, plus the file's signature taken before the lock is released,
    so a change another process makes right after cannot pass for ours."""
    with _locked(path) as lock:
        _remove_stale_temp_files(write_target(path))
        current = read_accounts(path)
        before = _serialise(path, current) if path.exists() else None
        changed = change(current)
        if changed is not None:
            after = _serialise(path, changed)
            if after != before:
                _still_locked(path, lock)
                _write_bytes(path, after.encode())
        return (current if changed is None else changed), _signature_after_write(path)


def _signature_after_write(path: Path) -> FileSignature | None:
    # The change is on disk: failing now would have the caller try it again (counting
    # twice). No signature just makes the next sync read the file again.
    try:
        return file_signature(path)
    except AccountsFileError:
        return None


def _remove_stale_temp_files(target: Path) -> None:
    # A writer killed between creating its temporary file and renaming it leaves one
    # behind, holding keys. Writers hold the lock, so an old one is nobody's.
    cutoff = time.time() - STALE_TEMP_AGE_S
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except OSError:
            pass


@contextmanager
def _locked(path: Path) -> Iterator[DirLock]:
    # Beside the target, not the link: a writer using the link and one using the real
    # path (or another link to it) must take the same lock, or one loses the other's
    # change. proper-lockfile resolves the path the same way (realpath), so the plugin
    # takes this same lock too.
    target = write_target(path)
    try:
        ensure_private_dir(target.parent)
    except OSError as e:
        raise AccountsFileError(path, _os_problem(e), "write") from e
    lock = DirLock(lock_path(target), timeout_s=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except LockTimeout as e:
        older = f" (an older kimi-rotator holds {e.path}: stop it)" if e.old_file else ""
        raise AccountsFileError(
            path, f"another process has held its lock for over {LOCK_TIMEOUT_S:g} s{older}", "lock"
        ) from e
    except OSError as e:
        raise AccountsFileError(path, f"cannot take its lock ({_os_problem(e)})", "lock") from e
    try:
        yield lock
    finally:
        lock.release()


def read_settled(path: Path) -> AccountsFile:
    """`read_accounts`, read once more under the lock if it fails: the OpenCode plugin
    rewrites the file in place (truncate, then write) while it holds the lock, so a read
    outside the lock can find it half written. Still failing, the first error stands."""
    try:
        return read_accounts(path)
    except AccountsFileError as first:
        try:
            with _locked(path):
                return read_accounts(path)
        except AccountsFileError:
            raise first from None


def lock_path(target: Path) -> Path:
    """The lock of the file `target` (a symlink's target, not the link): proper-lockfile's
    `<file>.lock`."""
    return target.with_name(target.name + ".lock")


def _still_locked(path: Path, lock: DirLock) -> None:
    # A holder stalled past the stale time (a suspended laptop) may have been taken
    # over: writing now would overwrite what the new holder writes.
    try:
        lock.ensure_held()
    except LockLost as e:
        raise AccountsFileError(path, f"lost its lock while holding it ({e})", "lock") from e


def _os_problem(e: OSError) -> str:
    return e.strerror or str(e)


class FileStore:
    """The `StateStore` on one accounts file, shared by the CLI and every local proxy."""

    def __init__(self, path: Path, clock: Clock = SYSTEM_CLOCK) -> None:
        self.path = path
        self._clock = clock
        self.location = str(path)
        self.what = "the accounts file"
        # $KIMI_ROTATOR_ACCOUNTS may be this process's only: another terminal needs the path.
        self.cli_options = "" if path == platform_accounts_path() else f"--accounts {shlex.quote(str(path))}"
        self.untold: str | None = None  # a file tells no one: its readers re-read it
        self._signature: FileSignature | None = None
        # After a failed read, never trust the signature: nothing said it is good.
        self._last_read_failed = False

    def read(self) -> AccountsFile:
        return read_settled(self.path)

    def edit(self, change: Callable[[AccountsFile], AccountsFile | None]) -> AccountsFile:
        return update_accounts(self.path, merge.editing(change, self._clock.now_ms()))

    def server_time_ms(self) -> None:
        return None  # the file's clock is this machine's

    def load(self) -> AccountsFile:
        try:
            # Signature first: a change landing between the two is then re-read later.
            self._signature = file_signature(self.path)
            state = read_accounts(self.path)
        except AccountsFileError:
            self._last_read_failed = True
            raise
        self._last_read_failed = False
        now = self._clock.now_ms()
        if edit_stamps.stamps_ahead(state, now):
            # Read as now, and written so at once: a proxy change made from now on is
            # newer than the person's, however far ahead the stamp said it was.
            try:
                state, self._signature = update_accounts_signed(self.path, merge.syncing(merge.PoolChange(), now))
            except AccountsFileError:
                edit_stamps.clamp_stamps(state, now)
                self._last_read_failed = True  # the next save writes it
        return state

    def sync(self, changes: merge.PoolChange) -> AccountsFile | None:
        """Merge `changes` into the file; the state it holds now, or None if neither we nor
        anyone else changed it since we last read it. Blocking: call from a worker thread."""
        if not changes and not self._last_read_failed and file_signature(self.path) == self._signature:
            return None
        try:
            state, self._signature = update_accounts_signed(
                self.path, merge.syncing(changes, self._clock.now_ms())
            )
        except AccountsFileError:
            self._last_read_failed = True
            raise
        self._last_read_failed = False
        return state

    def restore(self, pool: Callable[[AccountsFile], AccountsFile]) -> AccountsFile | None:
        return None  # never lost: a missing file is an empty pool (`sync` never raises PoolLost)

    def team_slots(self, ttl_ms: int) -> None:
        return None  # proxies on one file share a machine: each caps its own requests

    def team_pins(self) -> None:
        return None  # pins live in each process's memory

    def team_events(self) -> None:
        return None  # changes are seen by re-reading the file at each save

    def close(self) -> None:
        pass
