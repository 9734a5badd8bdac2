"""Which key serves the next request: pure functions of the accounts and the time.

`active_index` is the key the pool is on: the one sticky and health-based stay with,
and the one round-robin serves next (so `use-key N` means "the next request uses N"
under every strategy).

A key is *usable* when it is not disabled, not cooling (`rateLimitResetTime` and the
plugin's `billingLimitResetTime` both passed: `Account.cooling_until`) and not in
`skip` (keys already tried for this request, or at their in-flight cap).
A usable key is *healthy* at health >= 30 (resting recovery per `rest_ms`, see
`rotator.core.health.rest_period_ms`). Strategies choose among healthy keys; when
none is healthy they fall back to the usable ones rather than refuse work.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Sequence
from dataclasses import dataclass

from rotator.core.health import HEALTH_SKIP_BELOW, RECOVERY_PERIOD_MS, effective_health
from rotator.core.models import Account, Strategy

# Health-based stays on its current key while the key is at least this healthy.
STAY_HEALTHY = 70
# Health-based favours keys unused longest: +1 point per idle minute, up to this many.
FRESHNESS_MAX_POINTS = 10
_MINUTE_MS = 60_000
_BEST_POSSIBLE_SCORE = 100 + FRESHNESS_MAX_POINTS


class Shortage(enum.Enum):
    NO_KEYS = "no keys configured"
    ALL_DISABLED = "every key is disabled"
    ALL_COOLING = "every key is cooling down"
    ALL_SKIPPED = "every usable key is busy or already tried"
    THROTTLED = "Kimi is rate limiting every key at once; pausing all of them briefly"


@dataclass(frozen=True, slots=True)
class Unavailable:
    shortage: Shortage
    # Soonest moment a cooling key becomes usable again; None when waiting won't help.
    available_at_ms: int | None = None


def is_usable(account: Account, now_ms: int) -> bool:
    return (
        account.disabled_reason is None
        and account.rate_limit_reset_time <= now_ms
        and account.billing_limit_reset_time <= now_ms
    )


def choose_key(
    accounts: Sequence[Account],
    strategy: Strategy,
    active_index: int,
    now_ms: int,
    skip: Container[int] = (),
    rest_ms: int = RECOVERY_PERIOD_MS,
) -> int | Unavailable:
    """Index of the key to use, or why there is none."""
    count = len(accounts)
    if count == 0:
        return Unavailable(Shortage.NO_KEYS)
    active = active_index if 0 <= active_index < count else 0

    current = accounts[active]
    if active not in skip and is_usable(current, now_ms):
        # The common case, decided without looking at other keys: sticky stays, and
        # round-robin serves the key whose turn it is, while it is healthy. Resting
        # only raises a score: one that is high enough already needs no working out.
        floor = STAY_HEALTHY if strategy == "health-based" else HEALTH_SKIP_BELOW
        if current.health_score >= floor or effective_health(current, now_ms, rest_ms) >= floor:
            return active

    def usable(i: int) -> bool:
        return i not in skip and is_usable(accounts[i], now_ms)

    if strategy == "health-based":
        chosen = _best_scored(accounts, now_ms, usable, rest_ms)
    else:
        # round-robin serves the active key; sticky moves on from it.
        start = active if strategy == "round-robin" else active + 1
        chosen = _first_in_order(accounts, start, now_ms, usable, rest_ms)
    return chosen if chosen is not None else _why_unavailable(accounts, now_ms)


def _first_in_order(accounts, start, now_ms, usable, rest_ms) -> int | None:
    count = len(accounts)
    fallback: int | None = None
    for step in range(count):
        i = (start + step) % count
        if usable(i):
            if effective_health(accounts[i], now_ms, rest_ms) >= HEALTH_SKIP_BELOW:
                return i
            if fallback is None:
                fallback = i
    return fallback


def _best_scored(accounts, now_ms, usable, rest_ms) -> int | None:
    best: int | None = None
    best_score = float("-inf")
    for i, account in enumerate(accounts):
        if not usable(i):
            continue
        health = effective_health(account, now_ms, rest_ms)
        idle_minutes = (now_ms - account.last_used) / _MINUTE_MS
        score = health + min(FRESHNESS_MAX_POINTS, max(0.0, idle_minutes))
        if health < HEALTH_SKIP_BELOW:
            score -= 1000  # only when no healthy key exists
        if score > best_score:
            best, best_score = i, score
            if score >= _BEST_POSSIBLE_SCORE:
                break  # nothing later can beat it, and ties keep the first
    return best


def _why_unavailable(accounts: Sequence[Account], now_ms: int) -> Unavailable:
    # Nothing was chosen, so every enabled key is cooling, skipped, or both.
    enabled = [a for a in accounts if a.disabled_reason is None]
    if not enabled:
        return Unavailable(Shortage.ALL_DISABLED)
    deadlines = [a.cooling_until for a in enabled if a.cooling_until > now_ms]
    if len(deadlines) == len(enabled):
        return Unavailable(Shortage.ALL_COOLING, min(deadlines))
    # Some key is merely busy (or tried): it frees when a request on it ends, or a
    # cooling one at its deadline, whichever comes first.
    return Unavailable(Shortage.ALL_SKIPPED, min(deadlines, default=None))


def next_index(chosen: int, count: int, strategy: Strategy) -> int:
    """Where the pool's active index goes after `chosen` served a request."""
    if strategy == "round-robin":
        return (chosen + 1) % count
    return chosen
