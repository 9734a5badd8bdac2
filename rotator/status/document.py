"""What the status page and /metrics show: one snapshot of the running pool (each key's
state, load, counts and quota; the shared pause, refusals, recent events) and the
/status.json document built from it. Pure: no mitmproxy, no I/O, the time passed in.

A key's row is built on `rotator.core.key_view.view_key` (the one read model of a key), with
what only a running proxy knows added: requests in flight and the cap, this process's
outcomes and retries (`rotator.status.tally`), the pool's shared pause. Keys are only ever
shown masked; names and reasons are cleaned once more here (a reason set in memory by
the pool skips the model's validation), events were cleaned by the timeline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from rotator.core.health import HEALTH_SKIP_BELOW, rest_period_ms
from rotator.core.key_view import KeyState, KeyView, view_key
from rotator.core.models import AccountsFile
from rotator.core.oddities import first_index_by_key
from rotator.core.quota import QuotaReading, QuotaWindow
from rotator.core.stats import success_rate, utc_day
from rotator.core.text import NAME_MOST, REASON_MOST, clean_line
from rotator.conversations.pins import PinTable, SessionView
from rotator.core.keys import mask_key
from rotator.status.tally import Tally
from rotator.status.timeline import Event
from rotator.tokens import Usage, shown

SERVING = "serving"  # the pool's active key, usable
READY = "ready"
HALF_OPEN = "half-open"  # back from a cooldown: one request at a time until one succeeds
COOLING = "cooling"
DISABLED = "disabled"
STATES = (SERVING, READY, HALF_OPEN, COOLING, DISABLED)


class PoolReading(Protocol):
    """What a snapshot reads from a pool (rotator.pool.key_pool.KeyPool has it all)."""

    @property
    def state(self) -> AccountsFile: ...

    in_flight: Mapping[str, int]
    paused_until_ms: int

    def cap(self, key: str) -> int: ...


@dataclass(frozen=True, slots=True)
class KeyRow:
    index: int
    name: str
    masked_key: str
    state: str  # one of STATES
    active: bool
    reason: str | None  # why it is cooling or disabled
    until_ms: int  # when a cooling key may serve again; 0 otherwise
    health: int
    low_health: bool  # skipped while a healthier key can serve
    in_flight: int
    cap: int
    requests: int  # the accounts file's totals (every process, since the key was added)
    successful: int
    success_rate: float | None  # percent, one decimal; None before any request
    response_times: tuple[int | float, ...]  # the newest kept, copied
    outcomes: Mapping[str, int]  # this process's attempts by verdict (rotator.core.policy.Verdict)
    retries: int  # this process's resends on this key
    quota: QuotaReading | None  # the latest reading (a reading is replaced, never changed)
    tokens: Usage = Usage()  # the accounts file's totals since the key was added (rotator.tokens)
    tokens_today: Usage = Usage()  # today's (UTC)
    sessions: int = 0  # live conversations pinned to the key (conversation affinity)

    # Worked out when asked, so a snapshot taken on the event loop is only copies; the
    # pages ask in a worker thread.
    @property
    def median_ms(self) -> float | None:
        return median(self.response_times)

    @property
    def quota_taken_at(self) -> int | None:
        return None if self.quota is None else self.quota.taken_at

    @property
    def parallel_limit(self) -> int | None:
        return None if self.quota is None else self.quota.parallel_limit

    @property
    def windows(self) -> Sequence[QuotaWindow]:
        return () if self.quota is None else self.quota.windows

    def seconds_until_usable(self, now: int) -> float:
        """0 for a usable key, the seconds left for a cooling one, infinity for a disabled one
        (the pool's shared pause is not included: it is the pool's own figure)."""
        if self.state == DISABLED:
            return math.inf
        if self.state == COOLING:
            return max(0.0, (self.until_ms - now) / 1000)
        return 0.0


@dataclass(frozen=True, slots=True)
class StoreReading:
    """Where the pool is kept, and what is wrong with it (as the log said it), if anything."""

    location: str  # masked
    problem: str | None


@dataclass(frozen=True, slots=True)
class NotifyReading:
    """Where notifications go (masked: no tokens) and the last ones handled, oldest first,
    each as (at_ms, title, delivered to how many URLs, failed at how many)."""

    channels: tuple[str, ...]
    recent: tuple[tuple[int, str, int, int], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: int
    strategy: str
    active_index: int
    paused_until_ms: int
    refused: Mapping[str, int]  # the proxy's own answers by reason (rotator.status.tally)
    keys: tuple[KeyRow, ...]
    timeline: tuple[Event, ...]  # newest first
    store: StoreReading | None = None
    notify: NotifyReading | None = None
    sessions: tuple[SessionView, ...] = ()  # live conversations, most recently seen first

    @property
    def paused_seconds(self) -> float:
        return max(0.0, (self.paused_until_ms - self.now) / 1000)


def snapshot(pool: PoolReading, tally: Tally, events: Sequence[Event], now: int,
             store: StoreReading | None = None, notify: NotifyReading | None = None,
             pins: PinTable | None = None) -> Snapshot:
    """The pool as it is at `now`. `events` newest first (Timeline.newest_first());
    `pins`: the live conversations (conversation affinity), if on."""
    live = {} if pins is None else pins.counts(now)
    state = pool.state
    rest_ms = rest_period_ms(state)
    # The tally counts by key; a key listed twice is counted on its first entry only.
    first = first_index_by_key(state.accounts)
    outcomes: dict[str, dict[str, int]] = {}
    for (key, verdict), count in tally.outcomes.items():
        outcomes.setdefault(key, {})[verdict] = count
    rows = []
    today = utc_day(now)
    for index, account in enumerate(state.accounts):
        key = account.key
        counted = first.get(key) == index
        view = view_key(index, account, state.active_index, now, rest_ms)
        rows.append(_row(
            view, account.cooldown_level, pool.in_flight.get(key, 0) if counted else 0, pool.cap(key),
            outcomes.get(key, {}) if counted else {}, tally.retries.get(key, 0) if counted else 0, today,
            live.get(key, 0) if counted else 0,
        ))
    return Snapshot(
        now=now,
        strategy=state.rotation_strategy,
        active_index=state.active_index,
        paused_until_ms=pool.paused_until_ms,
        refused=dict(tally.refused),
        keys=tuple(rows),
        timeline=tuple(events),
        store=store,
        notify=notify,
        sessions=() if pins is None else tuple(pins.sessions(now, mask_key)),
    )


def key_state(view: KeyView, cooldown_level: int) -> str:
    if view.state is KeyState.DISABLED:
        return DISABLED
    if view.state is KeyState.COOLING:
        return COOLING
    if cooldown_level > 0:
        return HALF_OPEN
    return SERVING if view.active else READY


def _row(
    view: KeyView, cooldown_level: int, in_flight: int, cap: int, outcomes: Mapping[str, int], retries: int,
    today: str, sessions: int = 0,
) -> KeyRow:
    state = key_state(view, cooldown_level)
    reason = view.disabled_reason if state == DISABLED else view.cooldown_reason if state == COOLING else None
    if reason is not None:
        reason = clean_line(reason, REASON_MOST)
    total, ok = view.total_requests, view.successful_requests
    return KeyRow(
        index=view.index,
        name=clean_line(view.name, NAME_MOST),
        masked_key=view.masked_key,
        state=state,
        active=view.active,
        reason=reason,
        until_ms=view.rate_limit_reset_time if state == COOLING else 0,
        health=view.health,
        low_health=view.health < HEALTH_SKIP_BELOW,
        in_flight=in_flight,
        cap=cap,
        requests=total,
        successful=ok,
        success_rate=success_rate(total, ok),
        response_times=tuple(view.response_times),
        outcomes=outcomes,
        retries=retries,
        quota=view.quota,
        tokens=shown.saved(view.tokens),
        tokens_today=shown.on_days(view.daily_tokens, (today,)),
        sessions=sessions,
    )


def median(values: Sequence[int | float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2


# -- /status.json ---------------------------------------------------------------------

def status_json(shot: Snapshot) -> bytes:
    """The /status.json body (safe in a worker thread: a snapshot is never changed)."""
    return json.dumps(status_document(shot), ensure_ascii=False, separators=(",", ":")).encode()


def status_document(shot: Snapshot) -> dict[str, object]:
    """The /status.json document (camelCase, times in ms since the epoch)."""
    return {
        "now": shot.now,
        "strategy": shot.strategy,
        "activeIndex": shot.active_index,
        "pausedUntilMs": shot.paused_until_ms if shot.paused_until_ms > shot.now else 0,
        "refused": dict(shot.refused),
        "keys": [key_document(row) for row in shot.keys],
        "timeline": [{"atMs": e.at_ms, "text": e.text} for e in shot.timeline],
        "store": None if shot.store is None else {"location": shot.store.location, "problem": shot.store.problem},
        "notify": None if shot.notify is None else {
            "channels": list(shot.notify.channels),
            "recent": [{"atMs": at, "title": title, "delivered": ok, "failed": failed}
                       for at, title, ok, failed in shot.notify.recent],
        },
        "sessions": [session_document(s) for s in shot.sessions],
    }


def session_document(session: SessionView) -> dict[str, object]:
    """One live conversation: its id shortened, the client, the masked key."""
    return {
        "id": clean_line(session.id, NAME_MOST),
        "client": session.client,
        "maskedKey": session.key,
        "turns": session.turns,
        "moves": session.moves,
        "firstSeenMs": session.first_seen_ms,
        "lastSeenMs": session.last_seen_ms,
        "tokens": {"input": session.input_tokens, "output": session.output_tokens,
                   "cacheRead": session.cache_read_tokens},
        "cacheShare": session.cache_share,
    }


def key_document(row: KeyRow) -> dict[str, object]:
    windows = row.windows
    return {
        "index": row.index,
        "name": row.name,
        "maskedKey": row.masked_key,
        "state": row.state,
        "active": row.active,
        "reason": row.reason,
        "untilMs": row.until_ms,
        "health": row.health,
        "lowHealth": row.low_health,
        "inFlight": row.in_flight,
        "cap": row.cap,
        "requests": row.requests,
        "successfulRequests": row.successful,
        "successRate": row.success_rate,
        "medianLatencyMs": row.median_ms,
        "outcomes": dict(row.outcomes),
        "retries": row.retries,
        "tokens": row.tokens.as_fields(),
        "tokensToday": row.tokens_today.as_fields(),
        "cacheShareToday": row.tokens_today.cache_share,
        "sessions": row.sessions,
        "quota": None if row.quota_taken_at is None else {
            "takenAt": row.quota_taken_at,
            "parallelLimit": row.parallel_limit,
            "windows": [window_json(w) for w in windows],
        },
    }


SnapshotSource = Callable[[], Snapshot]


def window_json(window: QuotaWindow) -> dict[str, object]:
    """One quota window in JSON output (the CLI's and /status.json alike)."""
    return {
        "name": window.name, "minutes": window.minutes, "limit": window.limit, "used": window.used,
        "remaining": window.left, "resetTime": window.reset_time, "remainingRatio": window.remaining_ratio(),
    }
