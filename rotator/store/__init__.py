"""Where the pool's shared state lives: the `StateStore` interface every store implements.

The proxy's save loop (`rotator.sync`) and the CLI know only this interface; the
accounts file (`rotator.store.file`) is its first implementation.
"""

from __future__ import annotations

from collections.abc import Callable
import os
from typing import Protocol

from rotator.merge import PoolChange
from rotator.models import AccountsFile


class StoreError(Exception):
    """The store can't be read or written; the message says where and what. Nothing was
    written. `action` says what failed, for messages: "read", "write" or "lock"."""

    action: str = "read"


class StateStore(Protocol):
    location: str  # where the state lives, for messages
    what: str  # what it is, for messages: "the accounts file", "the team store"

    def read(self) -> AccountsFile:
        """The state as stored now."""
        ...

    def edit(self, change: Callable[[AccountsFile], AccountsFile | None]) -> AccountsFile:
        """A person's change, made atomically against the current state (None: no write)."""
        ...

    def load(self) -> AccountsFile:
        """The state a proxy starts from; later `sync` calls report changes since."""
        ...

    def sync(self, changes: PoolChange) -> AccountsFile | None:
        """Merge a proxy's changes; the state now stored, or None if nothing changed."""
        ...


STORE_ENV = "KIMI_ROTATOR_STORE"


def open_store(spec: str | None, accounts_path: "os.PathLike[str] | str", prefix: str | None = None) -> StateStore:
    """The store `spec` names: empty = the accounts file at `accounts_path`;
    `redis://` or `rediss://` = a Redis server (`prefix`: default "kimi-rotator:")."""
    from pathlib import Path

    spec = (spec or "").strip()
    if not spec:
        from rotator.store.file import FileStore

        return FileStore(Path(accounts_path))
    from rotator.store.urls import DEFAULT_PREFIX, masked_url

    if spec.startswith(("redis://", "rediss://")):
        try:
            from rotator.store.redis_store import RedisStore
        except ModuleNotFoundError as e:
            raise StoreError(
                f"{masked_url(spec)}: a team store needs the redis client ({e.name} is not installed):"
                " pip install 'kimi-rotator[team]'"
            ) from None
        return RedisStore(spec, prefix or DEFAULT_PREFIX)

    raise StoreError(f"{masked_url(spec)}: not a store (give nothing for the accounts file, or a redis:// or rediss:// URL)")
