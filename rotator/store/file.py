"""The accounts file as a state store: where it is, reading it, and changing it safely.

Every writer (the CLI and each running proxy) changes the file the same way: take the
cross-process lock, read the file, apply its change to what it read, write a temporary
file beside it, fsync, and rename it over the old one. A crash leaves the old or the new
file whole, and a change made by another process between our reads is never lost.
A file that cannot be read is never written.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import platformdirs
from filelock import FileLock, Timeout
from pydantic import ValidationError

from rotator import merge
from rotator.models import AccountsFile
from rotator.store import StoreError

ACCOUNTS_ENV = "KIMI_ROTATOR_ACCOUNTS"
ACCOUNTS_FILENAME = "kimi-accounts.json"
LOCK_TIMEOUT_S = 10.0
STALE_TEMP_AGE_S = 60.0


class AccountsFileError(StoreError):
    """The accounts file can't be read or written; the message names file and problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class FileSignature(NamedTuple):
    """Enough of a stat result to notice that another process replaced the file."""

    inode: int
    size: int
    mtime_ns: int


def default_accounts_path() -> Path:
    override = os.environ.get(ACCOUNTS_ENV)
    if override:
        return Path(override).expanduser()
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


def is_readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AccountsFileError(path, f"not valid JSON ({e})") from e
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


def write_accounts(path: Path, state: AccountsFile) -> None:
    """Replace the file atomically with `state` (mode 0600, its folder 0700)."""
    _write_bytes(path, state.to_json().encode())


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        _ensure_private_dir(path.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as tmp:
                os.fchmod(tmp.fileno(), 0o600)
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
    except OSError as e:
        raise AccountsFileError(path, _os_problem(e)) from e


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
    with _locked(path):
        _remove_stale_temp_files(path)
        current = read_accounts(path)
        before = current.to_json() if path.exists() else None
        changed = change(current)
        if changed is not None:
            after = changed.to_json()
            if after != before:
                _write_bytes(path, after.encode())
        return (current if changed is None else changed), file_signature(path)


def _remove_stale_temp_files(path: Path) -> None:
    # A writer killed between creating its temporary file and renaming it leaves one
    # behind, holding keys. Writers hold the lock, so an old one is nobody's.
    cutoff = time.time() - STALE_TEMP_AGE_S
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except OSError:
            pass


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        _ensure_private_dir(path.parent)
    except OSError as e:
        raise AccountsFileError(path, _os_problem(e)) from e
    lock = FileLock(str(path.with_name(path.name + ".lock")), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout as e:
        raise AccountsFileError(
            path, f"another process has held its lock for over {LOCK_TIMEOUT_S:g} s"
        ) from e
    except OSError as e:
        raise AccountsFileError(path, f"cannot take its lock ({_os_problem(e)})") from e
    try:
        yield
    finally:
        lock.release()


def _ensure_private_dir(folder: Path) -> None:
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_problem(e: OSError) -> str:
    return e.strerror or str(e)


class FileStore:
    """The `StateStore` on one accounts file, shared by the CLI and every local proxy."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        self._signature: FileSignature | None = None
        # After a failed read, never trust the signature: nothing said it is good.
        self._last_read_failed = False

    def read(self) -> AccountsFile:
        return read_accounts(self.path)

    def edit(self, change: Callable[[AccountsFile], AccountsFile | None]) -> AccountsFile:
        return update_accounts(self.path, change)

    def load(self) -> AccountsFile:
        try:
            # Signature first: a change landing between the two is then re-read later.
            self._signature = file_signature(self.path)
            state = read_accounts(self.path)
        except AccountsFileError:
            self._last_read_failed = True
            raise
        self._last_read_failed = False
        return state

    def sync(self, changes: merge.PoolChange) -> AccountsFile | None:
        """Merge `changes` into the file; the state it holds now, or None if neither we nor
        anyone else changed it since we last read it. Blocking: call from a worker thread."""
        if not changes and not self._last_read_failed and file_signature(self.path) == self._signature:
            return None
        try:
            state, self._signature = update_accounts_signed(
                self.path, lambda disk: merge.apply(disk, changes) if changes else None
            )
        except AccountsFileError:
            self._last_read_failed = True
            raise
        self._last_read_failed = False
        return state
