"""What Kimi's /usages answer and its reset times say (rotator.core.quota, rotator.core.reset_times)."""

import json

import pytest

from rotator.core.policy import Window
from rotator.core.quota import parse_usages, window_reset as reading_reset
from rotator.core.reset_times import parse_reset_time
from tests.support.accounts import NOW

FIVE_HOUR_RESET = "2027-01-15T10:30:00Z"
WEEKLY_RESET = "2027-01-18T00:00:00Z"


def usages(**overrides) -> bytes:
    document = {
        "usage": {"limit": "2048", "used": "2048", "remaining": "0", "resetTime": WEEKLY_RESET},
        "limits": [
            {
                "window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                "detail": {"limit": "200", "used": "200", "remaining": "0", "resetTime": FIVE_HOUR_RESET},
            }
        ],
        "parallel": {"limit": "30"},
    }
    document.update(overrides)
    return json.dumps(document).encode()


def window_reset(body, window, now):
    return reading_reset(parse_usages(body, now), window)


def test_five_hour_window_reset():
    assert window_reset(usages(), Window.FIVE_HOUR, NOW) == NOW + 9_000_000


def test_weekly_window_reset_from_the_usage_block():
    assert window_reset(usages(), Window.WEEKLY, NOW) == NOW + (2 * 86_400 + 16 * 3600) * 1000


def test_window_expressed_in_hours_is_recognised():
    body = usages(limits=[{"window": {"duration": "5", "timeUnit": "TIME_UNIT_HOUR"},
                           "detail": {"resetTime": FIVE_HOUR_RESET}}])
    assert window_reset(body, Window.FIVE_HOUR, NOW) == NOW + 9_000_000


def test_epoch_numbers_as_strings_are_accepted():
    body = usages(limits=[{"window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                           "detail": {"resetTime": str((NOW + 60_000) // 1000)}}])
    assert window_reset(body, Window.FIVE_HOUR, NOW) == NOW + 60_000


@pytest.mark.parametrize(
    "body, window",
    [
        (b"not json", Window.FIVE_HOUR),
        (b"[]", Window.WEEKLY),
        (usages(limits="nope"), Window.FIVE_HOUR),
        (usages(limits=[{"window": {"duration": "x"}, "detail": {}}]), Window.FIVE_HOUR),
        (usages(usage={"resetTime": "yesterday"}), Window.WEEKLY),
        (usages(usage={"resetTime": "2020-01-01T00:00:00Z"}), Window.WEEKLY),  # past
        (usages(), Window.BILLING_CYCLE),  # /usages says nothing about billing cycles
    ],
)
def test_answers_that_say_nothing_usable_give_none(body, window):
    assert window_reset(body, window, NOW) is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("2027-01-15T08:01:00Z", NOW + 60_000),
        ("2027-01-15T09:01:00+01:00", NOW + 60_000),
        (str(NOW + 5000), NOW + 5000),  # epoch ms
        (str((NOW + 5000) // 1000), NOW + 5000),  # epoch seconds
        ("30", NOW + 30_000),  # seconds from now
        ("garbage", None),
        ("", None),
        ("2099-01-01T00:00:00Z", None),  # implausibly far
    ],
)
def test_parse_reset_time(raw, expected):
    assert parse_reset_time(raw, NOW) == expected
