"""The TypeScript plugin's encrypted key backup: its byte layout, its plaintext, and merging one into a pool.

A backup file is base64 text of ``salt (32) | IV (16) | GCM tag (16) | ciphertext``:
AES-256-GCM under the key scrypt(password, salt, 32 bytes, N=16384, r=8, p=1), Node's
``scryptSync`` defaults, so the plugin's ``import-keys`` reads ours and ours reads its.
The plaintext is the plugin's JSON: ``version``, ``exportedAt`` (an ISO time),
``accounts`` with every field the file holds, ``rotationStrategy``,
``autoRefreshHealth`` and ``healthRefreshCooldownMinutes``. A plain accounts file (the
plugin's ``kimi-accounts.json``) has the same shape and imports the same way.

Everything here is pure; ``rotator.cli.export_import`` reads passwords and files.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from rotator.admin import ops
from rotator.core.keys import KEY_PREFIX, is_kimi_key, mask_key
from rotator.core.models import Account, AccountsFile, Strategy
from rotator.store.file import MAX_DEPTH, json_depth

DEFAULT_BACKUP_FILE = "kimi-keys-backup.json.enc"
BACKUP_VERSION = 1
SALT_LEN = 32
IV_LEN = 16
TAG_LEN = 16
KEY_LEN = 32
SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1  # Node's scryptSync defaults
PASSWORD_LEAST = 8
HEADER_LEN = SALT_LEN + IV_LEN + TAG_LEN
# Top-level settings an import restores (as the plugin restores the strategy).
SETTINGS = ("rotationStrategy", "autoRefreshHealth", "healthRefreshCooldownMinutes")
_DEFAULT_SETTINGS: dict[str, Any] = {"autoRefreshHealth": True, "healthRefreshCooldownMinutes": 30}


class BackupError(ops.OpError):
    """A backup that can't be made or read (wrong password, damaged, not a backup); nothing written."""

    exit_code = 2  # the CLI's: how it was asked for is wrong (--force missing, passwords differ)


class BackupUnreadable(BackupError):
    """The file is what is wrong: not a backup, damaged, or the password does not open it."""

    exit_code = 1


class BackupDoc(BaseModel):
    """The plaintext of a backup, or a plain accounts file: what an import reads."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    version: int = BACKUP_VERSION
    accounts: list[Account]
    rotation_strategy: Strategy | None = None
    auto_refresh_health: bool | None = None
    health_refresh_cooldown_minutes: int | None = Field(default=None, ge=1, le=1440)

    def settings(self) -> dict[str, Any]:
        """The settings the document holds, by their names on disk."""
        found = {
            "rotationStrategy": self.rotation_strategy,
            "autoRefreshHealth": self.auto_refresh_health,
            "healthRefreshCooldownMinutes": self.health_refresh_cooldown_minutes,
        }
        return {name: value for name, value in found.items() if value is not None}


# ------------------------------------------------------------------------- the bytes


def derive_key(password: str, salt: bytes) -> bytes:
    kdf = Scrypt(salt=salt, length=KEY_LEN, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(password.encode("utf-8"))


def encrypt(plaintext: bytes, password: str, salt: bytes, iv: bytes) -> str:
    """The backup text for `plaintext` (the caller supplies fresh random salt and IV)."""
    if len(salt) != SALT_LEN or len(iv) != IV_LEN:
        raise ValueError("salt must be 32 bytes and IV 16")
    sealed = AESGCM(derive_key(password, salt)).encrypt(iv, plaintext, None)
    ciphertext, tag = sealed[:-TAG_LEN], sealed[-TAG_LEN:]  # the plugin keeps the tag first
    return base64.b64encode(salt + iv + tag + ciphertext).decode("ascii")


def unwrap(text: bytes) -> bytes:
    """The raw bytes of a backup file's base64 text, or BackupError if it isn't one."""
    compact = b"".join(text.split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BackupUnreadable("not a kimi backup: the file is neither an accounts file (JSON) nor base64 text") from None
    if len(data) <= HEADER_LEN:
        raise BackupUnreadable(
            f"not a kimi backup, or a truncated one: {len(data)} bytes where a backup has more than {HEADER_LEN}"
        )
    return data


def decrypt(text: bytes, password: str) -> bytes:
    data = unwrap(text)
    salt, iv = data[:SALT_LEN], data[SALT_LEN : SALT_LEN + IV_LEN]
    tag, ciphertext = data[SALT_LEN + IV_LEN : HEADER_LEN], data[HEADER_LEN:]
    try:
        return AESGCM(derive_key(password, salt)).decrypt(iv, ciphertext + tag, None)
    except InvalidTag:
        raise BackupUnreadable("cannot decrypt the backup: wrong password, or the file is damaged or truncated") from None


# --------------------------------------------------------------------- the plaintext


def iso_time(ms: int) -> str:
    """`ms` as JavaScript's Date.toISOString() writes it: 2026-12-02T03:35:09.123Z."""
    moment = dt.datetime.fromtimestamp(ms // 1000, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def build_plaintext(state: AccountsFile, now_ms: int) -> bytes:
    """The plugin's export document for `state`: every field each account holds."""
    document = json.loads(state.to_json())  # by alias, unknown fields included
    exported: dict[str, Any] = {
        "version": BACKUP_VERSION,
        "exportedAt": iso_time(now_ms),
        "accounts": document["accounts"],
        "rotationStrategy": document["rotationStrategy"],
    }
    for name, default in _DEFAULT_SETTINGS.items():
        exported[name] = document.get(name, default)
    return json.dumps(exported, separators=(",", ":")).encode("utf-8")


def is_plain_json(raw: bytes) -> bool:
    """Whether `raw` is JSON text (an accounts file) rather than a backup (base64 never holds "{")."""
    return raw.lstrip().startswith(b"{")


def parse_document(raw: bytes, what: str) -> BackupDoc:
    """A backup's plaintext or an accounts file, checked; BackupError names what is wrong."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BackupUnreadable(f"{what} is nested too deeply to read") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BackupUnreadable(f"{what} is not valid JSON ({e})") from None
    if json_depth(data) > MAX_DEPTH:
        raise BackupUnreadable(f"{what} is nested too deeply to read")
    if not isinstance(data, dict) or not isinstance(data.get("accounts"), list):
        raise BackupUnreadable(f"{what} holds no list of accounts: not a kimi accounts file or backup")
    if data.get("version", BACKUP_VERSION) != BACKUP_VERSION:
        raise BackupUnreadable(f"{what} has version {data['version']!r}; this kimi-rotator reads version {BACKUP_VERSION}")
    try:
        document = BackupDoc.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise BackupUnreadable(f"{what} is not a valid kimi backup at {where}: {first['msg']}") from None
    for i, account in enumerate(document.accounts):
        if not is_kimi_key(account.key):  # as add-key refuses it: never sent, and a line break would inject headers
            raise BackupUnreadable(f'{what} is not a valid kimi backup at accounts.{i} ("{account.name}"): '
                              f"not a Kimi API key (they start with {KEY_PREFIX}; got {mask_key(account.key)}"
                              f"{_flaw(account.key)})")
    return document


def _flaw(key: str) -> str:
    """What makes `key` plainly no key, for a message that never shows it whole."""
    if "\r" in key or "\n" in key:
        return ", which holds a line break"
    if any(c.isspace() for c in key):
        return ", which holds a space"
    if not key.isprintable():
        return ", which holds a control character"
    return ""


# -------------------------------------------------------------------------- the merge


def _set_setting(state: AccountsFile, disk: str, value: Any, now_ms: int) -> None:
    if disk == "rotationStrategy":
        ops.set_strategy(value, now_ms)(state)  # the person's named change, stamped
        return
    for attr, info in type(state).model_fields.items():
        if (info.alias or attr) == disk:
            setattr(state, attr, value)
            state.edited_at[disk] = now_ms
            return
    assert state.model_extra is not None  # extra="allow"
    state.model_extra[disk] = value
    state.edited_at[disk] = now_ms


def import_op(incoming: BackupDoc, now_ms: int) -> ops.Op:
    """Add the keys of `incoming` the state lacks, with every field they hold; keys
    already there (or listed twice) are skipped and counted. When any key was added,
    the settings it holds are restored, as the plugin restores the strategy."""

    def change(state: AccountsFile) -> str:
        present = {account.key for account in state.accounts}
        imported = skipped = 0
        for account in incoming.accounts:
            if account.key in present:
                skipped += 1
                continue
            present.add(account.key)
            state.accounts.append(account.model_copy(deep=True))
            imported += 1
        lines = [
            "✓ Import complete:",
            f"  Imported: {imported} key(s)",
            f"  Skipped (duplicates): {skipped} key(s)",
        ]
        if imported:
            for disk, value in incoming.settings().items():
                _set_setting(state, disk, value, now_ms)
                shown = {"rotationStrategy": "rotation strategy", "autoRefreshHealth": "auto-refresh health",
                         "healthRefreshCooldownMinutes": "health refresh cooldown (minutes)"}[disk]
                lines.append(f"  Restored {shown}: {value if isinstance(value, str) else json.dumps(value)}")
        return "\n".join(lines)

    return change
