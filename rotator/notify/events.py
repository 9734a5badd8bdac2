"""What may be worth telling a person: the events the pool, the quota poller and the team
store report, as plain frozen values (keys already masked by the caller, times in ms
since the epoch).

A caller reports what it sees as often as it sees it; `rotator.notify.decide` keeps
each to one message per change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyRef:
    """A key as a message names it: `[1] Work (sk-kim…abcd)`. `masked` (the caller's
    masked key, never the key) is its identity across events: an index shifts when a
    key before it is removed, a masked key does not."""

    index: int
    name: str
    masked: str


@dataclass(frozen=True)
class KeyDisabled:
    """A key was disabled (a 401, a ban). `can_enable`: a person can put it back with
    `kimi-rotator enable-key INDEX` (False for a ban that nobody here can undo)."""

    key: KeyRef
    reason: str
    can_enable: bool = True


@dataclass(frozen=True)
class KeyEnabled:
    """A key is enabled again (by a person): nothing is said, but the next time it is
    disabled is a new change worth a message."""

    key: KeyRef


@dataclass(frozen=True)
class WindowSpent:
    """A key's quota window (`5-hour`, `weekly`, `billing`, ...) has nothing left until
    `resets_ms` (None: the answer did not say)."""

    key: KeyRef
    window: str
    resets_ms: int | None


@dataclass(frozen=True)
class PoolCannotServe:
    """No key can take a request: every enabled key is cooling (`cooling` of them) or
    disabled (`disabled`); the first to free does so at `next_free_ms` (None: none frees
    by itself, every key is disabled). The decider fills in `down_since_ms`, when the
    pool stopped serving."""

    next_free_ms: int | None
    cooling: int = 0
    disabled: int = 0
    down_since_ms: int | None = None


@dataclass(frozen=True)
class PoolServes:
    """A key took a request. Said only after `PoolCannotServe` was; the decider fills in
    `down_since_ms`, when the pool stopped serving."""

    down_since_ms: int | None = None


@dataclass(frozen=True)
class StoreUnreachable:
    """The team store cannot be reached. `store` is its URL already masked by the caller
    (no password); `reason` is outside text (a Redis error) and is cleaned."""

    store: str
    reason: str = ""


@dataclass(frozen=True)
class StoreBack:
    """The team store answers again; the decider fills in `down_since_ms`."""

    store: str
    down_since_ms: int | None = None


@dataclass(frozen=True)
class DigestRow:
    """One key's day: plain numbers from the caller. `cache_share` is the fraction of
    input tokens read from Kimi's cache (0..1), `quota_left` the percentage left in the
    key's tightest window; None when not known."""

    key: KeyRef
    requests: int
    tokens_in: int
    tokens_out: int
    cache_share: float | None = None
    quota_left: float | None = None


@dataclass(frozen=True)
class Digest:
    """The optional daily summary for `day` (`2025-06-12`, the caller's), once a day."""

    day: str
    rows: tuple[DigestRow, ...]


Event = (
    KeyDisabled | KeyEnabled | WindowSpent | PoolCannotServe | PoolServes
    | StoreUnreachable | StoreBack | Digest
)


@dataclass(frozen=True)
class Message:
    """What is sent: a short title and a plain-text body, both cleaned; `kind` names the
    event (`key-disabled`, ...) for the status page's list of messages sent."""

    kind: str
    title: str
    body: str
