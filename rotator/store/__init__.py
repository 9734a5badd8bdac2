"""Where the pool's shared state lives: the `StateStore` interface every store implements.

The proxy's save loop (`rotator.sync`) and the CLI know only this interface; the
accounts file (`rotator.store.file`) is its first implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rotator.merge import PoolChange
from rotator.models import AccountsFile


class StoreError(Exception):
    """The store can't be read or written; the message says where and what. Nothing was
    written. `action` says what failed, for messages: "read", "write" or "lock"."""

    action: str = "read"


class StateStore(Protocol):
    location: str  # where the state lives, for messages

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
