"""Health score arithmetic: pure functions of an account and the time.

The scores are the TypeScript plugin's: start at 100, +2 per success, -15 per rate
limit, -20 per failure, clamped to 0..100; below 30 a key is skipped.

Recovery rule (the plugin's, made exact): a key earns +10 for every whole 30 minutes
it has rested since its last penalty. Without it a key pushed under 30 would never be
picked again and so never earn its way back. The rest clock starts at
`healthRestSince`, or at `lastUsed` for files written by the plugin, which lack it.
"""

from __future__ import annotations

from typing import NamedTuple

from rotator.models import Account

HEALTH_MAX = 100
HEALTH_MIN = 0
HEALTH_SKIP_BELOW = 30
RECOVERY_POINTS = 10
RECOVERY_PERIOD_MS = 30 * 60 * 1000


def clamp_health(score: int) -> int:
    return max(HEALTH_MIN, min(HEALTH_MAX, score))


def rest_since(account: Account) -> int:
    return account.health_rest_since or account.last_used


def effective_health(account: Account, now_ms: int) -> int:
    """The score with resting recovery applied, as strategies should see it."""
    score = account.health_score
    if score >= HEALTH_MAX:
        return score
    start = rest_since(account)
    if start <= 0 or now_ms <= start:
        return score
    periods = (now_ms - start) // RECOVERY_PERIOD_MS
    return clamp_health(score + periods * RECOVERY_POINTS)


class HealthChange(NamedTuple):
    score: int
    rest_since: int


def apply_health_delta(account: Account, delta: int, now_ms: int) -> HealthChange:
    """New score and rest clock after an event worth `delta` points.

    Recovery earned so far is folded into the score; the rest clock moves forward by
    the whole periods used up, or restarts at `now_ms` on a penalty.
    """
    start = rest_since(account)
    recovered = effective_health(account, now_ms)
    if delta < 0:
        return HealthChange(clamp_health(recovered + delta), now_ms)
    used_periods = (recovered - account.health_score + RECOVERY_POINTS - 1) // RECOVERY_POINTS
    new_start = start + used_periods * RECOVERY_PERIOD_MS if start > 0 else now_ms
    return HealthChange(clamp_health(recovered + delta), new_start)
