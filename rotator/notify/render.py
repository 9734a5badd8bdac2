"""The words of each notification: a short title and a plain-text body for an event.

Pure: the time is passed in, the zone too (None: the machine's local zone). Every piece
of outside text (names, reasons, the store's URL, even the masked key) is cleaned and
bounded, and the finished title and body are scrubbed once more, so no full key and no
terminal escape can leave this machine whatever a caller hands in.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import tzinfo
from typing import Any

from rotator.notify.events import (
    Digest,
    DigestRow,
    Event,
    KeyDisabled,
    KeyRef,
    Message,
    PoolCannotServe,
    PoolServes,
    StoreBack,
    StoreUnreachable,
    WindowSpent,
)
from rotator.notify.text import clean, clean_body, duration, when

_Words = tuple[str, str, str]  # kind, title, body

APP = "kimi-rotator"
TITLE_MOST = 80  # what a desktop toast or a phone's lock screen shows whole
BODY_MOST = 1800  # under Discord's 2,000 characters; apprise fits it to services with less
NAME_MOST = 60  # a key's name inside a title or a line
REASON_MOST = 300  # why a key was disabled, why the store failed
MASKED_MOST = 20  # `sk-kim…abcd` is 11; anything longer was not masked by the caller
STORE_MOST = 120
DIGEST_MOST_ROWS = 30  # more keys than this: the rest are counted, not listed


def key_label(key: KeyRef) -> str:
    """`[1] Work (sk-kim…abcd)`, the form rotator.status.label gives every message."""
    name = clean(key.name, NAME_MOST) or "unnamed"
    return f"[{key.index}] {name} ({clean(key.masked, MASKED_MOST)})"


def short_label(key: KeyRef) -> str:
    """`[1] Work`: for a title, where the masked key would crowd out the news."""
    return f"[{key.index}] {clean(key.name, NAME_MOST) or 'unnamed'}"


def enable_command(key: KeyRef) -> str:
    return f"{APP} enable-key {key.index}"


def render(event: Event, now_ms: int, tz: tzinfo | None = None) -> Message | None:
    """The message for `event` at `now_ms`; None for an event that says nothing
    (a key enabled again)."""
    made = _RENDER.get(type(event))
    if made is None:
        return None
    kind, title, body = made(event, now_ms, tz)
    return Message(kind=kind, title=clean(title, TITLE_MOST), body=clean_body(body, BODY_MOST))


def _key_disabled(event: KeyDisabled, now_ms: int, tz: tzinfo | None) -> _Words:
    reason = clean(event.reason, REASON_MOST) or "no reason given"
    lines = [f"{key_label(event.key)} was disabled: {reason}."]
    if event.can_enable:
        lines.append(f"Once it is fixed, put it back with: {enable_command(event.key)}")
    else:
        lines.append("This cannot be undone from here; the other keys carry on.")
    return "key-disabled", f"Kimi key disabled: {short_label(event.key)}", "\n".join(lines)


def _window_spent(event: WindowSpent, now_ms: int, tz: tzinfo | None) -> _Words:
    window = clean(event.window, 30) or "quota"
    label = key_label(event.key)
    if event.resets_ms:
        resets = f"It resets {when(event.resets_ms, now_ms, tz)}"
    else:
        resets = "Kimi did not say when it resets"
    body = f"{label} has no {window} quota left. {resets}; the other keys carry on until then."
    return "window-spent", f"Kimi key {short_label(event.key)}: {window} quota spent", body


def _pool_cannot_serve(event: PoolCannotServe, now_ms: int, tz: tzinfo | None) -> _Words:
    counts = []
    if event.cooling:
        counts.append(f"{event.cooling} cooling down")
    if event.disabled:
        counts.append(f"{event.disabled} disabled")
    state = f" ({', '.join(counts)})" if counts else ""
    opening = "No key can take a request"
    if event.down_since_ms is not None and event.down_since_ms < now_ms:
        opening = f"No key has taken a request for {duration(now_ms - event.down_since_ms)}"
    lines = [f"{opening}: every key is cooling down or disabled{state}."]
    if event.next_free_ms is not None:
        lines.append(f"The next key frees {when(event.next_free_ms, now_ms, tz)}.")
    else:
        lines.append(f"No key frees by itself: re-enable one ({APP} enable-key INDEX) or add one.")
    return "pool-cannot-serve", "Kimi pool cannot serve", "\n".join(lines)


def _pool_serves(event: PoolServes, now_ms: int, tz: tzinfo | None) -> _Words:
    body = "A key takes requests again."
    if event.down_since_ms is not None and event.down_since_ms < now_ms:
        body = f"A key takes requests again, after {duration(now_ms - event.down_since_ms)} without one."
    return "pool-serves", "Kimi pool serves again", body


def _store_unreachable(event: StoreUnreachable, now_ms: int, tz: tzinfo | None) -> _Words:
    store = clean(event.store, STORE_MOST) or "the team store"
    reason = clean(event.reason, REASON_MOST)
    body = f"The team store {store} cannot be reached" + (f": {reason}." if reason else ".")
    return "store-unreachable", "Kimi team store unreachable", body


def _store_back(event: StoreBack, now_ms: int, tz: tzinfo | None) -> _Words:
    store = clean(event.store, STORE_MOST) or "the team store"
    body = f"The team store {store} answers again."
    if event.down_since_ms is not None and event.down_since_ms < now_ms:
        body = f"The team store {store} answers again, after {duration(now_ms - event.down_since_ms)}."
    return "store-back", "Kimi team store back", body


def _count(n: int) -> str:
    """`950`, `12.3k`, `4.1M`: token counts read at a glance."""
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


def _digest_line(row: DigestRow) -> str:
    parts = [
        f"{row.requests} request{'s' if row.requests != 1 else ''}",
        f"tokens {_count(row.tokens_in)} in / {_count(row.tokens_out)} out",
    ]
    if row.cache_share is not None:
        parts.append(f"cache {round(100 * min(1.0, max(0.0, row.cache_share)))}%")
    if row.quota_left is not None:
        parts.append(f"quota left {round(min(100.0, max(0.0, row.quota_left)))}%")
    return f"{key_label(row.key)}: {', '.join(parts)}"


def _digest(event: Digest, now_ms: int, tz: tzinfo | None) -> _Words:
    day = clean(event.day, 20)
    rows = event.rows[:DIGEST_MOST_ROWS]
    lines = [_digest_line(row) for row in rows] or ["No key took a request."]
    if len(event.rows) > len(rows):
        lines.append(f"… and {len(event.rows) - len(rows)} more keys.")
    total = sum(row.requests for row in event.rows)
    title = f"Kimi keys on {day}: {total} request{'s' if total != 1 else ''}"
    return "digest", title, "\n".join(lines)


_RENDER: dict[type, Callable[[Any, int, tzinfo | None], _Words]] = {
    KeyDisabled: _key_disabled,
    WindowSpent: _window_spent,
    PoolCannotServe: _pool_cannot_serve,
    PoolServes: _pool_serves,
    StoreUnreachable: _store_unreachable,
    StoreBack: _store_back,
    Digest: _digest,
}
