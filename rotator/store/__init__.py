"""Where the pool's shared state lives: the `StateStore` interface every store implements.

The proxy's save loop (`rotator.sync.save_loop`) and the CLI know only this interface; the
accounts file (`rotator.store.file`) is its first implementation, a Redis server
(`rotator.store.redis_store`) its second. A store shared by several machines also holds
the live state a team must share (`TeamSlots`: in-flight slots; `TeamEvents`: notices
of changes); the file store has none, and the proxy then keeps that state per process.
"""

from __future__ import annotations

from collections.abc import Callable
import enum
import os
from typing import NamedTuple, Protocol

from rotator.core.clock import SYSTEM_CLOCK, Clock
from rotator.core.merge import PoolChange
from rotator.core.models import AccountsFile


class StoreError(Exception):
    """The store can't be read or written; the message says where and what. Nothing was
    written. `action` says what failed, for messages: "read", "write" or "lock"."""

    action: str = "read"


class PoolLost(StoreError):
    """The store no longer holds the pool this process last saw in it: its server lost
    its data (a restart without persistence, a flush, an older snapshot). A person who
    empties the pool leaves a newer one, never this. Nothing was written; the message
    says where and what was found (`StateStore.restore` puts a pool back)."""


class StateStore(Protocol):
    location: str  # where the state lives, for messages
    what: str  # what it is, for messages: "the accounts file", "the team store"
    # The CLI's options that reach this store from another terminal: "" for the
    # default accounts file, else `--accounts PATH` or `--store URL` (masked).
    cli_options: str
    # Why the last notice to the team could not be sent (the write it followed was
    # made), or None: sent, or nothing to send.
    untold: str | None

    def read(self) -> AccountsFile:
        """The state as stored now."""
        ...

    def edit(self, change: Callable[[AccountsFile], AccountsFile | None]) -> AccountsFile:
        """A person's change, made atomically against the current state (None: no write)."""
        ...

    def server_time_ms(self) -> int | None:
        """A shared store's own clock (a Redis server's `TIME`), which a person's change is
        stamped by, or None: the store's clock is this machine's."""
        ...

    def load(self) -> AccountsFile:
        """The state a proxy starts from; later `sync` calls report changes since."""
        ...

    def sync(self, changes: PoolChange) -> AccountsFile | None:
        """Merge a proxy's changes; the state now stored, or None if nothing changed.
        Raises `PoolLost` if the pool this store last saw is gone."""
        ...

    def restore(self, pool: Callable[[AccountsFile], AccountsFile]) -> AccountsFile | None:
        """After `PoolLost`: store `pool(what is stored now)` as the pool, if it is still
        lost; the state stored, or None (found again: another process put it back)."""
        ...

    def team_slots(self, ttl_ms: int) -> "TeamSlots | None":
        """Team-wide in-flight slots (a slot not refreshed for `ttl_ms` expires), or None:
        every proxy on this store runs on this machine and caps its own requests."""
        ...

    def team_events(self) -> "TeamEvents | None":
        """Notices of what other processes changed, or None: this store has none to give."""
        ...

    def team_pins(self) -> "TeamPins | None":
        """Conversation pins shared by the team's proxies, or None: each process keeps
        its own in memory."""
        ...

    def close(self) -> None:
        """Let go of connections (a proxy switching stores)."""
        ...


class TeamSlots(Protocol):
    """A key's in-flight requests counted for every proxy on a shared store. Each async
    call is one server round trip; `StoreError` when the store does not answer in time."""

    ttl_ms: int  # a slot not refreshed for this long expires

    @property
    def unsent(self) -> int:
        """Slots given back that no call has carried yet."""
        ...

    async def take(self, key: str, cap: int) -> bool:
        """Hold one of `key`'s slots if fewer than `cap` are held; False: the team is at it.
        Slots given back since the last call go with it."""
        ...

    def give(self, key: str, cap: int) -> bool:
        """Give back one slot this proxy holds on `key` (`cap`: as taken, so that a proxy
        waiting for the key hears it freed). No round trip: it goes with the next `take`
        or `flush`. True when it should go now: this proxy's take filled the cap, so
        another may be waiting for it."""
        ...

    async def flush(self) -> None:
        """Send the slots given back that no take has carried yet."""
        ...

    async def refresh(self) -> None:
        """Keep this proxy's slots from expiring (slots of a proxy that died expire)."""
        ...

    async def ping(self) -> None:
        """Whether the store answers and runs what `take` runs (raises `StoreError` if
        not: unreachable, or a command the user may not run)."""
        ...

    async def close(self) -> None: ...


class TeamPins(Protocol):
    """Which key (by `urls.key_id`) each live conversation of the team is on."""

    async def recall(self, conversation_id: str, ttl_ms: int) -> str | None:
        """The key id it is pinned to, its TTL renewed; None if none."""
        ...

    async def remember(self, conversation_id: str, key_id: str, ttl_ms: int) -> None:
        """Pin it to that key for the team, for `ttl_ms`."""
        ...

    async def close(self) -> None: ...


class NoticeKind(enum.Enum):
    STATE = "state"  # the stored pool changed in a way others must see now: read it
    FREED = "freed"  # a slot on a key the team held at its cap was given back
    PAUSE = "pause"  # Kimi throttles the team: every key paused for `pause_ms`
    LIMITED = "limited"  # Kimi rate limited a key at another proxy: a throttle may be starting


class Notice(NamedTuple):
    kind: NoticeKind
    key_id: str = ""  # FREED, LIMITED: the key, as `urls.key_id` names it
    pause_ms: int = 0  # PAUSE: how long


class TeamEvents(Protocol):
    """Notices between the processes on a shared store."""

    async def listen(self, on_notice: Callable[[Notice], None], on_connected: Callable[[], None]) -> None:
        """Call `on_notice` for each notice until cancelled; reconnects with backoff,
        calling `on_connected` each time it (re)subscribes (notices may have been missed)."""
        ...

    async def pause(self, pause_ms: int) -> None:
        """Tell the team Kimi throttles it: every key paused for `pause_ms`."""
        ...

    async def limited(self, key_id: str) -> None:
        """Tell the team Kimi rate limited the key with this id (`urls.key_id`): each proxy
        counts it towards the throttle it detects."""
        ...

    async def close(self) -> None: ...


STORE_ENV = "KIMI_ROTATOR_STORE"


def open_store(spec: str | None, accounts_path: "os.PathLike[str] | str", prefix: str | None = None,
               clock: Clock = SYSTEM_CLOCK) -> StateStore:
    """The store `spec` names: empty = the accounts file at `accounts_path`;
    `redis://` or `rediss://` = a Redis server (`prefix`: default "kimi-rotator:").
    `clock`: the one this process times its changes by."""
    from pathlib import Path

    spec = (spec or "").strip()
    if not spec:
        from rotator.store.file import FileStore

        return FileStore(Path(accounts_path), clock)
    from rotator.store.urls import DEFAULT_PREFIX, masked_url

    if spec.startswith(("redis://", "rediss://")):
        try:
            from rotator.store.redis_store import RedisStore
        except ModuleNotFoundError as e:
            raise StoreError(
                f"{masked_url(spec)}: a team store needs the redis client ({e.name} is not installed):"
                " pip install 'kimi-rotator[team]'"
            ) from None
        return RedisStore(spec, prefix or DEFAULT_PREFIX, clock)

    raise StoreError(f"{masked_url(spec)}: not a store (give nothing for the accounts file, or a redis:// or rediss:// URL)")


def cli_command(store: StateStore, verb: str) -> str:
    """`kimi-rotator [--accounts PATH | --store URL] VERB`: the command a person runs, in
    another terminal, to change this store (hints name it, not the default file)."""
    return " ".join(part for part in ("kimi-rotator", store.cli_options, verb) if part)
