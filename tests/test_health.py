from rotator.core.health import (
    RECOVERY_PERIOD_MS,
    apply_health_delta,
    clamp_health,
    effective_health,
)
from rotator.core.models import Account
from tests.support.accounts import NOW



def account(**fields) -> Account:
    return Account(key="sk-kimi-FAKEhealth00000001", **fields)


def test_clamp_keeps_scores_in_range():
    assert clamp_health(130) == 100
    assert clamp_health(-5) == 0
    assert clamp_health(42) == 42


def test_success_adds_two_up_to_one_hundred():
    assert apply_health_delta(account(health_score=80, last_used=NOW), 2, NOW).score == 82
    assert apply_health_delta(account(health_score=99, last_used=NOW), 2, NOW).score == 100


def test_penalties_subtract_and_floor_at_zero():
    assert apply_health_delta(account(health_score=100), -15, NOW).score == 85
    assert apply_health_delta(account(health_score=100), -20, NOW).score == 80
    assert apply_health_delta(account(health_score=10), -20, NOW).score == 0


def test_penalty_restarts_the_rest_clock():
    change = apply_health_delta(account(health_score=50, health_rest_since=NOW - 10 * RECOVERY_PERIOD_MS), -20, NOW)
    assert change.rest_since == NOW


def test_resting_recovers_ten_points_per_whole_half_hour():
    rested = account(health_score=20, health_rest_since=NOW)
    assert effective_health(rested, NOW + RECOVERY_PERIOD_MS - 1) == 20
    assert effective_health(rested, NOW + RECOVERY_PERIOD_MS) == 30
    assert effective_health(rested, NOW + 3 * RECOVERY_PERIOD_MS + 5) == 50
    assert effective_health(rested, NOW + 100 * RECOVERY_PERIOD_MS) == 100


def test_plugin_files_without_a_rest_clock_recover_from_last_used():
    plugin_account = account(health_score=0, last_used=NOW - 2 * RECOVERY_PERIOD_MS)
    assert effective_health(plugin_account, NOW) == 20


def test_recovery_is_folded_in_once_not_counted_twice():
    rested = account(health_score=20, health_rest_since=NOW)
    later = NOW + 2 * RECOVERY_PERIOD_MS + 1000
    change = apply_health_delta(rested, 2, later)
    assert change.score == 42
    after = account(health_score=change.score, health_rest_since=change.rest_since)
    # Right after the success, no further recovery is due: the used periods are spent.
    assert effective_health(after, later) == 42
    assert effective_health(after, NOW + 3 * RECOVERY_PERIOD_MS) == 52
