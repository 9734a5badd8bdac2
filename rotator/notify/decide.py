"""Which reported events become a message: each change once, never once per request.

Pure: `decide(said, event, now_ms)` returns the new record of what was said and the
event to send (None: nothing to say). Callers report what they see as often as they see
it (every refusal of an all-cooling pool, every save that fails to reach the store).

Rules
- A key disabled: once, until it is enabled again (`KeyEnabled`); disabled twice without
  that in between is one message. Keys are told apart by their masked form.
- A quota window spent: once per key, per window, per reset moment. Reset moments
  within `RESET_SLACK_MS` of each other are one moment (a reset read from headers
  drifts by seconds from one answer to the next). A record is forgotten once its reset
  has passed, or a day after it was said when Kimi gave no reset moment.
- The pool cannot serve: said when it starts, then at most once per `POOL_REPEAT_MS`
  while it lasts; "serves again" once when it ends (and only if the start was said).
- The team store unreachable: once per outage, and once when it answers again.
- The daily digest: once per day (the caller's day string).
A clock that steps back never makes something be said again sooner: a moment recorded
in the future counts as now.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rotator.notify.events import (
    Digest,
    Event,
    KeyDisabled,
    KeyEnabled,
    PoolCannotServe,
    PoolServes,
    StoreBack,
    StoreUnreachable,
    WindowSpent,
)

MINUTE_MS = 60 * 1000
POOL_REPEAT_MS = 10 * MINUTE_MS
RESET_SLACK_MS = 5 * MINUTE_MS  # shorter than any window (the shortest Kimi has is 5 hours)
UNKNOWN_RESET_FORGET_MS = 24 * 60 * MINUTE_MS


@dataclass(frozen=True)
class SpentWindow:
    """A spent window already said: whose, which, until when, and when it was said."""

    masked: str
    window: str
    resets_ms: int | None
    said_ms: int


@dataclass(frozen=True)
class Said:
    """What has been said and still holds; empty at start."""

    disabled: frozenset[str] = frozenset()  # masked keys said to be disabled
    windows: tuple[SpentWindow, ...] = ()
    pool_down_since_ms: int | None = None  # the pool cannot serve since (None: it serves)
    pool_said_ms: int | None = None  # when "cannot serve" was last said
    store_down_since_ms: int | None = None
    digest_day: str | None = None


def decide(said: Said, event: Event, now_ms: int) -> tuple[Said, Event | None]:
    """The record after `event` at `now_ms`, and what to send about it (None: nothing)."""
    if isinstance(event, KeyDisabled):
        if event.key.masked in said.disabled:
            return said, None
        return replace(said, disabled=said.disabled | {event.key.masked}), event
    if isinstance(event, KeyEnabled):
        return replace(said, disabled=said.disabled - {event.key.masked}), None
    if isinstance(event, WindowSpent):
        return _window_spent(said, event, now_ms)
    if isinstance(event, PoolCannotServe):
        return _pool_cannot_serve(said, event, now_ms)
    if isinstance(event, PoolServes):
        if said.pool_down_since_ms is None:
            return said, None
        since = said.pool_down_since_ms
        return replace(said, pool_down_since_ms=None, pool_said_ms=None), PoolServes(since)
    if isinstance(event, StoreUnreachable):
        if said.store_down_since_ms is not None:
            return said, None
        return replace(said, store_down_since_ms=now_ms), event
    if isinstance(event, StoreBack):
        if said.store_down_since_ms is None:
            return said, None
        since = said.store_down_since_ms
        return replace(said, store_down_since_ms=None), replace(event, down_since_ms=since)
    if isinstance(event, Digest):
        if said.digest_day == event.day:
            return said, None
        return replace(said, digest_day=event.day), event
    return said, None


def _same_reset(a: int | None, b: int | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= RESET_SLACK_MS


def _still_holds(window: SpentWindow, now_ms: int) -> bool:
    if window.resets_ms is None:
        return now_ms < window.said_ms + UNKNOWN_RESET_FORGET_MS
    return window.resets_ms > now_ms


def _window_spent(said: Said, event: WindowSpent, now_ms: int) -> tuple[Said, Event | None]:
    windows = tuple(w for w in said.windows if _still_holds(w, now_ms))
    resets = event.resets_ms or None  # 0 is how an answer says "not said"
    for window in windows:
        if (
            window.masked == event.key.masked
            and window.window == event.window
            and _same_reset(window.resets_ms, resets)
        ):
            return replace(said, windows=windows), None
    spent = SpentWindow(event.key.masked, event.window, resets, now_ms)
    return replace(said, windows=(*windows, spent)), event


def _pool_cannot_serve(said: Said, event: PoolCannotServe, now_ms: int) -> tuple[Said, Event | None]:
    if said.pool_down_since_ms is None or said.pool_said_ms is None:
        down = replace(said, pool_down_since_ms=now_ms, pool_said_ms=now_ms)
        return down, replace(event, down_since_ms=now_ms)
    last = min(said.pool_said_ms, now_ms)  # a clock stepped back: said just now
    if now_ms - last < POOL_REPEAT_MS:
        return replace(said, pool_said_ms=last), None
    since = min(said.pool_down_since_ms, now_ms)
    again = replace(said, pool_down_since_ms=since, pool_said_ms=now_ms)
    return again, replace(event, down_since_ms=since)
