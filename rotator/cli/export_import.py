"""The export-keys and import-keys verbs: passwords, the backup file on disk, and their arguments.

The format and the merge are `rotator.admin.backup`'s; this is the thin shell around them.
A password is asked without echo at a terminal (twice for export), or read as the first
line of standard input when that is not a terminal, so scripts can pipe it. A backup is
written 0600 and atomically, and never over an existing file without ``--force``.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import secrets
import sys
from pathlib import Path

from rotator.admin import backup, ops
from rotator.store import StateStore
from rotator.store.safe_write import write_private

log = logging.getLogger(__name__)


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", nargs="?", default=backup.DEFAULT_BACKUP_FILE,
                        help=f"the backup to write (default {backup.DEFAULT_BACKUP_FILE})")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")


def import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE",
                        help="an encrypted backup (either tool's export-keys) or a plain accounts file")


def read_password(prompt: str, confirm: bool, least: int = 1) -> str:
    """The password: asked without echo at a terminal (its length checked before it is
    asked again to confirm), else standard input's first line."""
    stdin = sys.stdin
    if stdin is None:
        raise backup.BackupError("no standard input to read the password from")
    if stdin.isatty():
        try:
            password = getpass.getpass(f"Enter {prompt} password: ")
            _check_length(password, least)
            if confirm and getpass.getpass(f"Confirm {prompt} password: ") != password:
                raise backup.BackupError("the passwords do not match; nothing written")
        except EOFError:
            password = ""
    else:
        password = stdin.readline().rstrip("\r\n")
    _check_length(password, least)
    return password


def _check_length(password: str, least: int) -> None:
    if not password:
        raise backup.BackupError("no password given (type it at the prompt, or pipe it as the first line)")
    if len(password) < least:
        raise backup.BackupError(f"the password must be at least {least} characters")


def export_keys(args: argparse.Namespace, store: StateStore, now_ms: int) -> str:
    """Write the backup; what to tell the person."""
    target = Path(args.file).expanduser()
    state = store.read()
    if not state.accounts:
        return "No keys to export."
    if not args.force and (target.exists() or target.is_symlink()):
        raise backup.BackupError(f"{target} exists; give --force to replace it")
    password = read_password("encryption", confirm=True, least=backup.PASSWORD_LEAST)
    text = backup.encrypt(backup.build_plaintext(state, now_ms), password,
                          secrets.token_bytes(backup.SALT_LEN), secrets.token_bytes(backup.IV_LEN))
    _write_private(target, text.encode("ascii"), replace=args.force)
    return f"✓ Exported {ops.plural(len(state.accounts), 'key')} to: {target}\n  Keep this file and your password safe!"


def _write_private(target: Path, data: bytes, replace: bool) -> None:
    """Write `data` to `target` (0600) atomically; without `replace`, never over an existing file."""
    try:
        write_private(target, data, replace=replace)
    except FileExistsError:
        raise backup.BackupError(f"{target} exists; give --force to replace it") from None
    except OSError as e:
        raise backup.BackupUnreadable(f"cannot write {target}: {e.strerror or e}") from None


def read_import(path: Path) -> backup.BackupDoc:
    """The accounts in FILE: a plain accounts file as it is, a backup decrypted."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise backup.BackupUnreadable(f"cannot read {path}: {e.strerror or e}") from None
    if backup.is_plain_json(raw):
        return backup.parse_document(raw, f"{path}")
    backup.unwrap(raw)  # not a backup at all: say so before asking for a password
    plaintext = backup.decrypt(raw, read_password("decryption", confirm=False))
    return backup.parse_document(plaintext, f"the backup {path}")


def import_keys(args: argparse.Namespace, now_ms: int) -> ops.Op:
    incoming = read_import(Path(args.file).expanduser())
    log.debug("importing %d account(s) from %s", len(incoming.accounts), args.file)
    return backup.import_op(incoming, now_ms)
