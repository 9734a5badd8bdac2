"""Quota readings in process: parsing every /usages window, steering the pool by them
(a spent window cools the key before Kimi refuses it; Kimi's parallel limit caps it),
and the newest reading winning a merge."""

from __future__ import annotations

import json

import pytest

from rotator.core import merge
from rotator.core.models import Account, AccountsFile
from rotator.core.policy import Window
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.core.quota import (
    FIVE_HOUR_MINUTES,
    WEEK_MINUTES,
    QuotaReading,
    QuotaWindow,
    parallel_cap,
    parse_usages,
    steer,
    window_name,
    window_reset,
)
from rotator.core.key_view import KeyState, view_pool
from rotator.core.strategies import Shortage, Unavailable
from testbed.hooks import FakeClock
from tests.support.accounts import KEYS, NOW

HOUR = 3_600_000


def usages(five_hour=(200, 3, 197), weekly=(2048, 3, 2045), five_hour_reset=NOW + 2 * HOUR,
           weekly_reset=NOW + 50 * HOUR, parallel="30", **extra) -> bytes:
    limit, used, remaining = five_hour
    wlimit, wused, wremaining = weekly
    document = {
        "user": {"membership": {"level": "LEVEL_ADVANCED"}},
        "usage": {"limit": str(wlimit), "used": str(wused), "remaining": str(wremaining),
                  "resetTime": str(weekly_reset)},
        "limits": [{"window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                    "detail": {"limit": str(limit), "used": str(used), "remaining": str(remaining),
                               "resetTime": str(five_hour_reset)}}],
        "parallel": {"limit": parallel},
    }
    document.update(extra)
    return json.dumps(document).encode()


# -- parsing ---------------------------------------------------------------------------------

def test_every_window_and_the_parallel_limit_are_read_with_numbers_as_strings():
    reading = parse_usages(usages(), NOW)
    assert reading is not None
    assert reading.taken_at == NOW
    assert [(w.minutes, w.limit, w.used, w.remaining, w.reset_time) for w in reading.windows] == [
        (FIVE_HOUR_MINUTES, 200, 3, 197, NOW + 2 * HOUR),
        (WEEK_MINUTES, 2048, 3, 2045, NOW + 50 * HOUR),
    ]
    assert reading.parallel_limit == 30
    assert [w.name for w in reading.windows] == ["5-hour", "weekly"]


def test_a_window_in_hours_and_one_in_days_are_named_by_their_length():
    body = usages(limits=[
        {"window": {"duration": "5", "timeUnit": "TIME_UNIT_HOUR"}, "detail": {"limit": 10, "used": 1}},
        {"window": {"duration": 1, "timeUnit": "TIME_UNIT_DAY"}, "detail": {"limit": 50, "used": 50}},
    ])
    reading = parse_usages(body, NOW)
    assert reading is not None
    assert [w.name for w in reading.windows] == ["5-hour", "1-day", "weekly"]
    assert reading.windows[0].left == 9  # no `remaining`: limit minus used


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"limits": "x"}', b"{}", b'{"parallel": {"limit": "x"}}'])
def test_an_answer_that_is_not_a_usages_document_gives_no_reading(body):
    assert parse_usages(body, NOW) is None


@pytest.mark.parametrize("odd", ["-5", "NaN", "1e400", True, [], {"a": 1}, "12abc"])
def test_odd_numbers_read_as_unknown_not_as_an_error(odd):
    body = usages(limits=[{"window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                           "detail": {"limit": odd, "used": "5", "resetTime": str(NOW + HOUR)}}])
    reading = parse_usages(body, NOW)
    assert reading is not None
    assert reading.windows[0].limit is None
    assert reading.windows[0].used == 5


def test_a_huge_number_is_capped_not_turned_into_a_giant_int():
    body = usages(five_hour=("9" * 20, 1, 1))
    reading = parse_usages(body, NOW)
    assert reading is not None and reading.windows[0].limit == 10**15


def test_the_refused_window_reset_comes_from_the_reading():
    reading = parse_usages(usages(), NOW)
    assert window_reset(reading, Window.FIVE_HOUR) == NOW + 2 * HOUR
    assert window_reset(reading, Window.WEEKLY) == NOW + 50 * HOUR
    assert window_reset(reading, Window.BILLING_CYCLE) is None


def test_window_names():
    assert [window_name(m) for m in (300, 10080, 1440, 30, None)] == ["5-hour", "weekly", "1-day", "30-minute", "unnamed"]


# -- steering ----------------------------------------------------------------------------------

def reading_of(body: bytes, at: int = NOW) -> QuotaReading:
    reading = parse_usages(body, at)
    assert reading is not None
    return reading


def test_a_spent_window_steers_until_it_resets_and_says_which():
    spent = steer(reading_of(usages(five_hour=(200, 200, 0))), 1.0, NOW)
    assert spent is not None
    assert spent.until_ms == NOW + 2 * HOUR
    assert spent.reason == "5-hour quota spent (200 of 200 used), per Kimi's /usages"


def test_the_reserve_counts_a_nearly_spent_window_as_spent():
    nearly = reading_of(usages(five_hour=(200, 199, 1)))
    assert steer(nearly, 1.0, NOW) is not None  # 1 left of 200 is at most 1 %
    assert steer(nearly, 0.0, NOW) is None
    assert steer(reading_of(usages(five_hour=(200, 190, 10))), 1.0, NOW) is None


def test_when_two_windows_are_spent_the_later_reset_wins():
    spent = steer(reading_of(usages(five_hour=(200, 200, 0), weekly=(2048, 2048, 0))), 1.0, NOW)
    assert spent is not None and spent.until_ms == NOW + 50 * HOUR
    assert spent.reason.startswith("weekly quota spent")


def test_a_reading_whose_reset_has_passed_does_not_steer():
    assert steer(reading_of(usages(five_hour=(200, 200, 0))), 1.0, NOW + 3 * HOUR) is None


def test_parallel_cap_is_the_lower_of_kimis_and_the_proxys():
    assert parallel_cap(QuotaReading(parallel_limit=2), 30) == 2
    assert parallel_cap(QuotaReading(parallel_limit=50), 30) == 30
    assert parallel_cap(None, 30) == 30


# -- the pool ------------------------------------------------------------------------------------

def pool_of(*accounts: Account, clock: FakeClock | None = None, max_in_flight: int = 30) -> KeyPool:
    return KeyPool(AccountsFile(accounts=list(accounts)), max_in_flight, clock or FakeClock(NOW))


def test_a_reading_with_a_spent_window_cools_the_key_before_any_refusal():
    pool = pool_of(Account(key=KEYS[0]), Account(key=KEYS[1]))
    event = pool.take_reading(KEYS[0], reading_of(usages(five_hour=(200, 200, 0))), NOW)
    assert event is not None and "cooling for 2h 00m, until " in event and ": 5-hour quota spent" in event
    for _ in range(5):
        lease = pool.acquire(NOW)
        assert isinstance(lease, Lease) and lease.key == KEYS[1]
        pool.release(lease, _ok(), NOW)
    view = view_pool(pool.state, NOW)[0]
    assert view.state is KeyState.COOLING
    assert view.rate_limit_reset_time == NOW + 2 * HOUR
    assert view.cooldown_reason == "5-hour quota spent (200 of 200 used), per Kimi's /usages"
    assert view.quota is not None and view.quota.windows[0].used == 200
    # Steering is not a refusal: no backoff level, no health lost.
    assert pool.accounts[0].cooldown_level == 0 and pool.accounts[0].health_score == 100


def test_every_key_spent_answers_when_the_first_window_resets():
    pool = pool_of(Account(key=KEYS[0]))
    pool.take_reading(KEYS[0], reading_of(usages(five_hour=(200, 200, 0))), NOW)
    assert pool.acquire(NOW) == Unavailable(Shortage.ALL_COOLING, NOW + 2 * HOUR)
    assert isinstance(pool.acquire(NOW + 2 * HOUR), Lease)


def test_kimis_parallel_limit_caps_the_keys_in_flight_requests():
    pool = pool_of(Account(key=KEYS[0]), Account(key=KEYS[1]))
    pool.take_reading(KEYS[0], reading_of(usages(parallel="2")), NOW)
    assert pool.cap(KEYS[0]) == 2 and pool.cap(KEYS[1]) == 30
    pool.state.rotation_strategy = "sticky"
    keys = [pool.acquire(NOW) for _ in range(3)]
    assert [lease.key for lease in keys if isinstance(lease, Lease)] == [KEYS[0], KEYS[0], KEYS[1]]


def test_a_reading_saved_by_another_process_steers_the_pool_when_adopted():
    clock = FakeClock(NOW)
    pool = pool_of(Account(key=KEYS[0]), Account(key=KEYS[1]), clock=clock)
    on_disk = AccountsFile(accounts=[
        Account(key=KEYS[0], quota=reading_of(usages(five_hour=(200, 200, 0), parallel="3"))),
        Account(key=KEYS[1]),
    ])
    events = pool.adopt(on_disk)
    assert len(events) == 1 and "cooling for 2h 00m, until " in events[0]
    assert pool.accounts[0].rate_limit_reset_time == NOW + 2 * HOUR
    assert pool.cap(KEYS[0]) == 3
    # The cooldown is a change of this pool's: it is saved like any other.
    assert pool.take_changes().keys[KEYS[0]].fields["rate_limit_reset_time"].value == NOW + 2 * HOUR
    assert pool.adopt(on_disk) == []  # said once


def test_a_person_who_cleared_the_cooldown_after_the_reading_is_not_overruled():
    clock = FakeClock(NOW)
    reading = reading_of(usages(five_hour=(200, 200, 0)), at=NOW - 60_000)
    cleared = Account(key=KEYS[0], quota=reading, edited_at={"rateLimitResetTime": NOW - 1000})
    pool = pool_of(cleared, clock=clock)
    assert pool.accounts[0].rate_limit_reset_time == 0
    assert isinstance(pool.acquire(NOW), Lease)
    # A newer reading that still says spent does cool it again.
    assert pool.take_reading(KEYS[0], reading_of(usages(five_hour=(200, 200, 0))), NOW) is not None


def test_the_newest_reading_wins_a_merge_whoever_saves_last():
    older = QuotaReading(taken_at=NOW - 1000, windows=[QuotaWindow(minutes=300, limit=200, used=10)])
    newer = QuotaReading(taken_at=NOW, windows=[QuotaWindow(minutes=300, limit=200, used=20)])
    on_disk = AccountsFile(accounts=[Account(key=KEYS[0], quota=newer)])
    change = merge.PoolChange()
    change.for_key(KEYS[0]).set("quota", older, NOW + 5000)  # saved later, taken earlier
    merge.apply(on_disk, change)
    assert on_disk.accounts[0].quota == newer
    change = merge.PoolChange()
    newest = newer.model_copy(update={"taken_at": NOW + 1})
    change.for_key(KEYS[0]).set("quota", newest, NOW + 5000)
    merge.apply(on_disk, change)
    assert on_disk.accounts[0].quota == newest


def test_a_reading_round_trips_through_the_file_format_under_camel_case_names():
    account = Account(key=KEYS[0], quota=reading_of(usages()))
    document = json.loads(AccountsFile(accounts=[account]).to_json())
    saved = document["accounts"][0]["quota"]
    assert saved["takenAt"] == NOW and saved["parallelLimit"] == 30
    assert saved["windows"][0] == {"minutes": 300, "limit": 200, "used": 3, "remaining": 197,
                                   "resetTime": NOW + 2 * HOUR}
    assert AccountsFile.model_validate(document).accounts[0].quota == account.quota


def _ok():
    from rotator.core import policy
    return policy.classify(200, {}, b"{}", NOW)
