"""The keys and accounts files tests start from: the one ``NOW``, the one ``KEYS``, a fake
key of the real shape, and the one pool writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rotator.core.models import Account, AccountsFile
from rotator.store import file as storage
from testbed.hooks import NOW

__all__ = ["DAY", "HOUR", "KEYS", "NOW", "TODAY", "fake_key", "fake_keys", "write_pool"]

TODAY = "2027-01-15"  # NOW's day, UTC
HOUR = 3_600_000
DAY = 86_400_000


def fake_key(label: str | int) -> str:
    """An obviously fake key of the real shape: sk-kimi- plus 32 characters."""
    return f"sk-kimi-FAKE{str(label):0>28}"[:40]


def fake_keys(n: int, label: str = "key") -> list[str]:
    """`n` fake keys: fake_key(f"{label}0"), fake_key(f"{label}1"), ..."""
    return [fake_key(f"{label}{i}") for i in range(n)]


KEYS = fake_keys(3)  # the conftest fixture `keys` is these three


def write_pool(path: Path, keys: list[str] | list[Account], strategy: str = "round-robin", *,
               fields: dict[str, dict[str, Any]] | None = None, **top: Any) -> Path:
    """An accounts file at `path` with `keys` named "Account 0", "Account 1", ...: the
    i-th account's own fields from ``fields["k{i}"]``, the file's from `top`; an Account
    in `keys` is written as it is. Returns `path`."""
    fields = fields or {}
    accounts = [key if isinstance(key, Account) else Account(key=key, name=f"Account {i}", **fields.get(f"k{i}", {}))
                for i, key in enumerate(keys)]
    storage.write_accounts(path, AccountsFile(accounts=accounts, rotation_strategy=strategy, **top))
    return path
