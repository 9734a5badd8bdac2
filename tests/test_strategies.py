from pathlib import Path

import pytest

from rotator.core.models import Account
from rotator.core.strategies import Shortage, Unavailable, choose_key, next_index
from tests.support.accounts import NOW



def pool(*healths: int, **per_index) -> list[Account]:
    accounts = [
        Account(key=f"sk-kimi-FAKEstrategy{i:012d}", name=f"k{i}", health_score=h, last_used=NOW)
        for i, h in enumerate(healths)
    ]
    for name, changes in per_index.items():
        index = int(name.removeprefix("k"))
        for field, value in changes.items():
            setattr(accounts[index], field, value)
    return accounts


def run(accounts, strategy, requests, active=0, now=NOW):
    """Indices chosen for `requests` consecutive requests, as the pool would move."""
    order = []
    for _ in range(requests):
        chosen = choose_key(accounts, strategy, active, now)
        assert not isinstance(chosen, Unavailable), chosen
        order.append(chosen)
        active = next_index(chosen, len(accounts), strategy)
    return order


def test_round_robin_cycles_through_every_key_starting_at_the_active_one():
    assert run(pool(100, 100, 100), "round-robin", 7) == [0, 1, 2, 0, 1, 2, 0]
    assert run(pool(100, 100, 100), "round-robin", 4, active=2) == [2, 0, 1, 2]


def test_round_robin_skips_cooling_disabled_and_unhealthy_keys():
    accounts = pool(100, 100, 20, 100, k1={"rate_limit_reset_time": NOW + 1000}, k3={"disabled_reason": "revoked"})
    assert run(accounts, "round-robin", 3) == [0, 0, 0]


def test_sticky_stays_until_the_key_cools_then_moves_on_and_stays_there():
    accounts = pool(100, 100, 100)
    assert run(accounts, "sticky", 3) == [0, 0, 0]
    accounts[0].rate_limit_reset_time = NOW + 60_000
    assert run(accounts, "sticky", 3) == [1, 1, 1]


def test_sticky_leaves_a_key_that_fell_below_thirty():
    accounts = pool(25, 100, 100)
    assert run(accounts, "sticky", 2) == [1, 1]


def test_health_based_stays_on_a_healthy_current_key():
    assert run(pool(100, 100, 100), "health-based", 5, active=1) == [1, 1, 1, 1, 1]


def test_health_based_moves_to_the_healthiest_when_current_weakens():
    accounts = pool(60, 90, 95)
    assert choose_key(accounts, "health-based", 0, NOW) == 2


def test_health_based_prefers_the_key_unused_longest_among_equals():
    accounts = pool(50, 100, 100)
    accounts[1].last_used = NOW - 1_000
    accounts[2].last_used = NOW - 5 * 60_000
    assert choose_key(accounts, "health-based", 0, NOW) == 2


def test_health_based_freshness_bonus_is_capped():
    accounts = pool(50, 100, 85)
    accounts[1].last_used = NOW
    accounts[2].last_used = NOW - 24 * 3600_000  # idle a day: +10 at most
    accounts[2].health_rest_since = NOW  # penalised just now: no resting recovery yet
    assert choose_key(accounts, "health-based", 0, NOW) == 1


@pytest.mark.parametrize("strategy", ["round-robin", "health-based", "sticky"])
def test_low_health_keys_are_used_when_nothing_better_exists(strategy):
    accounts = pool(10, 20, k0={"rate_limit_reset_time": NOW + 5})
    assert choose_key(accounts, strategy, 0, NOW) == 1


@pytest.mark.parametrize("strategy", ["round-robin", "health-based", "sticky"])
def test_no_keys(strategy):
    assert choose_key([], strategy, 0, NOW) == Unavailable(Shortage.NO_KEYS)


@pytest.mark.parametrize("strategy", ["round-robin", "health-based", "sticky"])
def test_all_cooling_reports_the_soonest_deadline(strategy):
    accounts = pool(
        100, 100, 100,
        k0={"rate_limit_reset_time": NOW + 30_000},
        k1={"rate_limit_reset_time": NOW + 10_000},
        k2={"disabled_reason": "banned"},
    )
    assert choose_key(accounts, strategy, 0, NOW) == Unavailable(Shortage.ALL_COOLING, NOW + 10_000)


@pytest.mark.parametrize("strategy", ["round-robin", "health-based", "sticky"])
def test_busy_and_cooling_keys_are_not_all_cooling(strategy):
    """One key busy (at its cap: in `skip`), the other cooling: the truth is that a key
    is busy, and the cooling one's deadline is still when waiting surely helps."""
    accounts = pool(100, 100, k1={"rate_limit_reset_time": NOW + 10_000})
    assert choose_key(accounts, strategy, 0, NOW, skip={0}) == Unavailable(Shortage.ALL_SKIPPED, NOW + 10_000)


def test_every_key_busy_says_busy_not_cooling():
    from rotator.core.models import AccountsFile
    from rotator.proxy import answers

    accounts = pool(100, 100)
    why = choose_key(accounts, "round-robin", 0, NOW, skip={0, 1})
    from rotator.store.file import FileStore

    answer = answers.no_key(why, AccountsFile(accounts=accounts), NOW, FileStore(Path("accounts.json")), None)
    text = answer.get_text()
    assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
    assert "every usable key is busy or already tried; a busy key frees when a request on it ends." in text
    assert "cooling" not in text


@pytest.mark.parametrize("strategy", ["round-robin", "health-based", "sticky"])
def test_all_disabled(strategy):
    accounts = pool(100, k0={"disabled_reason": "revoked"})
    assert choose_key(accounts, strategy, 0, NOW) == Unavailable(Shortage.ALL_DISABLED)


@pytest.mark.parametrize("strategy", ["round-robin", "health-based", "sticky"])
def test_skipped_keys_are_not_chosen(strategy):
    accounts = pool(100, 100, 100)
    assert choose_key(accounts, strategy, 0, NOW, skip={0, 1}) == 2
    assert choose_key(accounts, strategy, 0, NOW, skip={0, 1, 2}) == Unavailable(Shortage.ALL_SKIPPED)


def test_a_cooldown_that_has_passed_makes_the_key_usable_again():
    accounts = pool(100, k0={"rate_limit_reset_time": NOW})
    assert choose_key(accounts, "sticky", 0, NOW) == 0


def test_out_of_range_active_index_is_treated_as_zero():
    assert choose_key(pool(100, 100), "sticky", 9, NOW) == 0
