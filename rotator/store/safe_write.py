"""Putting a file on disk so that a crash leaves the old one or the new one whole, and only
its owner can read it: a temporary file beside the target (mode 0600), fsync, rename,
the folder fsynced too and created private (0700)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def write_private(target: Path, data: bytes, *, replace: bool = True) -> None:
    """Put `data` at `target` atomically, mode 0600: a temporary file beside it, fsync,
    then rename (or, without `replace`, a link that fails with FileExistsError if a file
    is there, even one that appeared meanwhile). Raises OSError; leaves no temporary file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), 0o600)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        if replace:
            os.replace(tmp_name, target)
        else:
            os.link(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    fsync_dir(target.parent)


def is_readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def ensure_private_dir(folder: Path) -> None:
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)


def fsync_dir(folder: Path) -> None:
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
