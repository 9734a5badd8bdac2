"""The accounts file's cross-process lock, taken exactly as the TypeScript plugin takes it.

The plugin locks with the npm package proper-lockfile (v4, lib/lockfile.js), so this is
its protocol, and kimi-rotator and the plugin exclude each other on one file:

- the lock is a directory `<file>.lock`; making it (mkdir) is the atomic step, and
  EEXIST means someone holds it;
- a holder keeps the directory's mtime fresh while it holds it (proper-lockfile every
  stale/2, at least every second); a directory whose mtime is older than `stale` is
  abandoned: remove it and mkdir once more (if that mkdir fails, the lock is held);
  so, here, is one whose mtime is more than `stale` in the future (no holder set that);
- release is rmdir; a holder that finds the mtime changed under it has lost the lock
  (proper-lockfile calls it compromised) and must not write or remove anything.

Our holds last milliseconds, but a save of a large file on a slow disk can last longer
than the plugin's 5 s stale time, so a daemon thread refreshes the mtime every second
while a lock is held: one thread start per hold, and a held lock never looks abandoned.
A kimi-rotator's own lock directory also carries a mark the plugin ignores (see DirLock),
so a kimi-rotator killed while saving holds up the next one for no time, as flock did.

Older kimi-rotator versions locked with `filelock`, which leaves a regular file at the
same path after every write. That file holds nothing unless an old kimi-rotator has it
flock()ed at this moment: when nobody has, it is removed (and the plugin can lock again
too); when somebody has, the lock counts as held, and a timeout says an older
kimi-rotator holds it.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterator
from contextlib import contextmanager
import logging
import os
import stat
import threading
import time
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows: removing a file another process has open fails instead
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# The plugin's LOCK_STALE_MS (src/storage.ts): both tools must agree when a lock is abandoned.
STALE_S = 5.0
REFRESH_S = 1.0
POLL_S = 0.05


class LockTimeout(Exception):
    """The lock stayed held for the whole timeout."""

    def __init__(self, path: Path, waited_s: float, old_file: bool) -> None:
        super().__init__(f"{path}: held for over {waited_s:g} s")
        self.path = path
        self.waited_s = waited_s
        # The holder was an older kimi-rotator (a flock()ed regular file at the path).
        self.old_file = old_file


class LockLost(Exception):
    """Another process took the lock over while we held it (it judged it abandoned)."""


class Found(enum.Enum):
    """What is at the lock's path when mkdir says something is there."""

    NOTHING = "nothing"  # released meanwhile
    HELD = "held"  # a lock directory refreshed within the stale time (the plugin's, say)
    OURS = "ours"  # the same, made by a kimi-rotator: held while that one's flock is
    STALE = "stale"  # a lock directory nobody refreshed: abandoned
    AHEAD = "ahead"  # a lock directory whose mtime lies in the future: abandoned too
    OLD_FILE = "old file"  # a regular file, left by an older kimi-rotator
    OTHER = "other"  # a link, a socket...: not ours to remove


def judge(st: os.stat_result | None, now_s: float, stale_s: float) -> Found:
    """What an lstat of the lock's path says about it (proper-lockfile's isLockStale,
    plus our own mark: the sticky bit, which a directory proper-lockfile makes never has).
    A directory whose mtime lies more than `stale_s` ahead was set so by no holder
    refreshing it (a clock stepped back since, a copy, a hand edit): it is as abandoned
    as one more than `stale_s` old, where proper-lockfile would wait until then."""
    if st is None:
        return Found.NOTHING
    if stat.S_ISDIR(st.st_mode):
        if st.st_mtime < now_s - stale_s:
            return Found.STALE
        if st.st_mtime > now_s + stale_s:
            return Found.AHEAD
        return Found.OURS if st.st_mode & stat.S_ISVTX else Found.HELD
    if stat.S_ISREG(st.st_mode):
        return Found.OLD_FILE
    return Found.OTHER


Mark = tuple[int, int]  # (inode, mtime in ns) of the directory as we last stamped it


class DirLock:
    """proper-lockfile's lock on the directory `path`; a context manager.

    acquire() retries until `timeout_s` and raises LockTimeout, or OSError for anything
    but a held lock; release() never raises (a lock it cannot remove goes stale).

    On top of the protocol, and invisible to the plugin, a kimi-rotator's lock directory
    carries the sticky bit and is flock()ed by its holder while held: the kernel drops
    the flock when the holder dies, so a kimi-rotator killed while saving blocks the
    next kimi-rotator for no time at all, not the 5 s stale time. The directory is made
    with the mark already on (mkdir's mode), and the step from making it to flocking it
    happens under a flock of the folder (`_creating`): a killed holder can never leave an
    unmarked directory behind (which would look like the plugin's and block for 5 s),
    and a marked one nobody has flocked, seen while nobody is creating, is a dead one's.
    """

    def __init__(self, path: Path, *, timeout_s: float = 10.0, stale_s: float = STALE_S,
                 refresh_s: float = REFRESH_S) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.stale_s = stale_s
        self.refresh_s = refresh_s
        self._mark: Mark | None = None
        self._guard = threading.Lock()  # one stamp or check of the mark at a time
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._fds: list[int] = []  # flocks kept while held: the directory's, an old file's
        self._old_file_busy = False

    @property
    def held(self) -> bool:
        return self._mark is not None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this DirLock")
        deadline = time.monotonic() + self.timeout_s
        self._old_file_busy = False
        while not self._try_once():
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(self.path, self.timeout_s, self._old_file_busy)
            time.sleep(min(POLL_S, left))
        self._stop.clear()
        self._refresher = threading.Thread(
            target=self._refresh_loop, name=f"lock refresher {self.path.name}", daemon=True)
        self._refresher.start()

    def ensure_held(self) -> None:
        """Raise LockLost unless the directory is still the one we made and stamped."""
        with self._guard:
            if self._mark is None or _mark_of(self.path) != self._mark:
                raise LockLost(f"{self.path} was taken over by another process")

    def release(self) -> None:
        if self._mark is None:
            return
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        with self._guard:
            mark, self._mark = self._mark, None
            try:
                if _mark_of(self.path) == mark:
                    os.rmdir(self.path)  # before the flock goes: see _remove_if_holder_ended
                else:
                    log.warning("%s was taken over by another process while held; left to it", self.path)
            except OSError as e:
                log.warning("cannot remove the lock %s (%s); it goes stale in %g s", self.path,
                            e.strerror or e, self.stale_s)
            finally:
                self._close_fds()

    # -- the steps --------------------------------------------------------------------

    def _try_once(self) -> bool:
        if self._mkdir():
            return True
        try:
            st: os.stat_result | None = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        now_s = time.time()
        found = judge(st, now_s, self.stale_s)
        if found is Found.HELD:
            return False
        if found is Found.OURS:
            if not _remove_if_holder_ended(self.path):
                return False
        elif found in (Found.STALE, Found.AHEAD):
            if found is Found.STALE:
                log.info("taking over %s: its holder stopped refreshing it over %g s ago",
                         self.path, self.stale_s)
            else:
                assert st is not None
                log.warning("taking over %s: its modification time is %.0f s in the future, so no holder is "
                            "refreshing it (a clock set back since, or a copied lock)",
                            self.path, st.st_mtime - now_s)
            try:
                os.rmdir(self.path)
            except FileNotFoundError:
                pass
        elif found is Found.OLD_FILE:
            removed, fd = _remove_unused_old_file(self.path)
            if not removed:
                self._old_file_busy = True  # an older kimi-rotator is saving: wait for it
                return False
            if fd is not None:
                # An older kimi-rotator that opened the file before it went waits on
                # this flock until we release; one that opens the path now finds a directory.
                self._fds.append(fd)
        elif found is Found.OTHER:
            raise OSError(errno.ENOTDIR, f"{self.path} is neither a lock directory nor an old lock "
                          "file; remove it")
        if self._mkdir():  # once, as proper-lockfile does after removing a stale lock
            return True
        self._close_fds()
        return False

    def _mkdir(self) -> bool:
        with _creating(self.path) as had:
            if not had:  # another is making its lock at this moment: held; try again
                return False
            try:
                os.mkdir(self.path, 0o700 | stat.S_ISVTX)  # marked from its first moment
            except FileExistsError:
                return False
            try:
                if fcntl is not None:
                    # Blocking, but only a waiter judging a dead holder's directory
                    # holds it, for microseconds, and only while nobody is creating.
                    fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                    self._fds.append(fd)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    os.fchmod(fd, 0o700 | stat.S_ISVTX)  # where mkdir's mode dropped the mark
                with self._guard:
                    self._mark = _stamp(self.path)
            except OSError:
                _rmdir_quietly(self.path)
                self._close_fds()
                raise
        return True

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._guard:
                if self._mark is None:
                    return
                try:
                    if _mark_of(self.path) != self._mark:
                        log.warning("%s was taken over by another process while held", self.path)
                        return
                    self._mark = _stamp(self.path)
                except OSError as e:
                    log.warning("cannot refresh the lock %s (%s)", self.path, e.strerror or e)


def _stamp(path: Path) -> Mark:
    # Our own nanosecond mtime: a directory another process makes in the same
    # millisecond still differs, so ensure_held tells a takeover from our lock.
    now = time.time_ns()
    os.utime(path, ns=(now, now))
    mark = _mark_of(path)
    if mark is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    return mark


def _mark_of(path: Path) -> Mark | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


@contextmanager
def _creating(path: Path) -> Iterator[bool]:
    """Hold a flock on the lock's folder: whoever is between making a lock directory
    and flocking it holds it, so nobody judges such a directory abandoned meanwhile.
    Yields whether it was had. Held for microseconds, so a process that does not get it
    tries again later (a frozen holder then costs a timeout, never a hang)."""
    if fcntl is None:
        yield True
        return
    try:
        fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield True  # a folder we cannot open: no guard, and mkdir says what is wrong with it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing drops the flock


def _remove_if_holder_ended(path: Path) -> bool:
    """Remove the kimi-rotator lock directory at `path` if its holder has ended (its
    flock is gone); whether it did. Judged while nobody is creating one (`_creating`):
    a marked directory is flock()ed before that guard is let go and removed before its
    flock goes, so a marked directory whose flock we get then is a dead holder's.
    Removed while we hold its flock: no other waiter can judge it so."""
    if fcntl is None:
        return False
    with _creating(path) as nobody_creating:
        return nobody_creating and _remove_unflocked(path)


def _remove_unflocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return False  # gone, or replaced: the next try sees what is there now
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        if not st.st_mode & stat.S_ISVTX or st.st_ino != os.lstat(path).st_ino:
            return False  # not a kimi-rotator's (the plugin's), or not at `path` any more
        os.rmdir(path)
    except OSError:
        return False
    finally:
        os.close(fd)
    log.info("taking over %s: the kimi-rotator that held it has ended", path)
    return True


def _remove_unused_old_file(path: Path) -> tuple[bool, int | None]:
    """Remove an older kimi-rotator's lock file unless one has it locked. Whether it is
    gone, and the removed file's descriptor, still flock()ed (None if it was gone already)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True, None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)  # on Windows, fails while another process has it open
    except (BlockingIOError, PermissionError):
        os.close(fd)
        return False, None
    except FileNotFoundError:
        os.close(fd)
        return True, None
    except BaseException:
        os.close(fd)
        raise
    log.info("removed %s, an unused lock file left by an older kimi-rotator "
             "(the lock is now a directory, as the OpenCode plugin takes it)", path)
    return True, fd


def _rmdir_quietly(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
