"""Health score arithmetic: pure functions of an account and the time.

The scores are the TypeScript plugin's: start at 100, +2 per success, -15 per rate
limit, -20 per failure, clamped to 0..100; below 30 a key is skipped.

Recovery rule (the plugin's health refresh, made exact): a key earns +10 for every whole
rest period since its last penalty. The period is the file's
`healthRefreshCooldownMinutes` (default 30), and `autoRefreshHealth: false` turns
recovery at rest off (`rest_period_ms` gives 0). Without it a key pushed under 30 would
never be picked again and so never earn its way back. The rest clock starts at
`healthRestSince`, or at `lastUsed` for files written by the plugin, which lack it.
"""

from __future__ import annotations

from typing import NamedTuple

from rotator.core.models import DEFAULT_COOLDOWN_MINUTES, Account, AccountsFile

HEALTH_MAX = 100
HEALTH_MIN = 0
HEALTH_SKIP_BELOW = 30
RECOVERY_POINTS = 10
RECOVERY_PERIOD_MS = DEFAULT_COOLDOWN_MINUTES * 60 * 1000


def clamp_health(score: int) -> int:
    return max(HEALTH_MIN, min(HEALTH_MAX, score))


def rest_period_ms(state: AccountsFile) -> int:
    """The rest each +10 takes, as the file sets it; 0 when recovery at rest is off."""
    if not state.auto_refresh_health:
        return 0
    return int(state.health_refresh_cooldown_minutes * 60 * 1000)


def rest_since(account: Account) -> int:
    return account.health_rest_since or account.last_used


def effective_health(account: Account, now_ms: int, period_ms: int = RECOVERY_PERIOD_MS) -> int:
    """The score with resting recovery applied, as strategies should see it."""
    score = account.health_score
    if score >= HEALTH_MAX or period_ms <= 0:
        return score
    start = rest_since(account)
    if start <= 0 or now_ms <= start:
        return score
    periods = (now_ms - start) // period_ms
    return clamp_health(score + periods * RECOVERY_POINTS)


class HealthChange(NamedTuple):
    score: int
    rest_since: int


def apply_health_delta(
    account: Account, delta: int, now_ms: int, period_ms: int = RECOVERY_PERIOD_MS
) -> HealthChange:
    """New score and rest clock after an event worth `delta` points.

    Recovery earned so far is folded into the score; the rest clock moves forward by
    the whole periods used up, or restarts at `now_ms` on a penalty.
    """
    start = rest_since(account)
    recovered = effective_health(account, now_ms, period_ms)
    if delta < 0:
        return HealthChange(clamp_health(recovered + delta), now_ms)
    used_periods = (recovered - account.health_score + RECOVERY_POINTS - 1) // RECOVERY_POINTS
    new_start = start + used_periods * period_ms if start > 0 else now_ms
    return HealthChange(clamp_health(recovered + delta), new_start)
