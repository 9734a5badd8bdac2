import pytest
from mitmproxy.http import Headers

from rotator.core.reset_times import (
    MAX_AHEAD_MS,
    later_deadline,
    reset_deadline_from_headers,
)
from tests.support.accounts import NOW

S = 1000
DAY = 24 * 3600 * S


def deadline(**headers: str) -> int | None:
    return reset_deadline_from_headers({k.replace("_", "-"): v for k, v in headers.items()}, NOW)


# -- retry-after ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", NOW + 120 * S),
        ("1", NOW + S),
        (" 30 ", NOW + 30 * S),
        ("1.5", NOW + 1500),
        ("1.1", NOW + 1100),  # exact, not 1101 from float error
        ("0.0001", NOW + 1),  # rounded up: never come back early
        (".5", NOW + 500),
        ("2.", NOW + 2 * S),
        ("1152", NOW + 1152 * S),  # Moonshot's daily-token-limit answer
        ("2678400", NOW + 31 * DAY),  # exactly the 31-day limit
    ],
)
def test_retry_after_seconds(value: str, expected: int) -> None:
    assert deadline(retry_after=value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Fri, 15 Jan 2027 08:02:00 GMT", NOW + 120 * S),
        ("Fri, 15 Jan 2027 09:02:00 +0100", NOW + 120 * S),
        ("Fri, 15 Jan 2027 08:02:00 -0000", NOW + 120 * S),  # no zone given: UTC
        ("15 Jan 2027 08:00:01 GMT", NOW + S),
    ],
)
def test_retry_after_http_date(value: str, expected: int) -> None:
    assert deadline(retry_after=value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1500", NOW + 1500), ("1500.2", NOW + 1501), ("0.4", NOW + 1), ("2678400000", NOW + 31 * DAY)],
)
def test_retry_after_ms(value: str, expected: int) -> None:
    assert deadline(retry_after_ms=value) == expected


# -- anthropic-ratelimit-*-reset ---------------------------------------------------------

@pytest.mark.parametrize(
    "name",
    [
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-output-tokens-reset",
    ],
)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2027-01-15T08:01:00Z", NOW + 60 * S),
        ("2027-01-15t08:01:00z", NOW + 60 * S),
        ("2027-01-15T08:01:00+00:00", NOW + 60 * S),
        ("2027-01-15T10:01:00+02:00", NOW + 60 * S),
        ("2027-01-15T02:31:00-05:30", NOW + 60 * S),
        ("2027-01-15T08:01:00.250Z", NOW + 60 * S + 250),
        ("2027-01-15T08:01:00.123456789Z", NOW + 60 * S + 124),  # nanoseconds, rounded up
        ("2027-01-15 08:01:00Z", NOW + 60 * S),
        ("2027-01-15T08:01:00", NOW + 60 * S),  # no offset: UTC
    ],
)
def test_anthropic_reset_rfc3339(name: str, value: str, expected: int) -> None:
    assert reset_deadline_from_headers({name: value}, NOW) == expected


# -- x-ratelimit-reset by magnitude --------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30", NOW + 30 * S),  # small: seconds from now
        ("0.5", NOW + 500),
        ("86400", NOW + DAY),
        ("1800000060", NOW + 60 * S),  # > 10**9: epoch seconds
        ("1800000060.5", NOW + 60 * S + 500),
        ("1800000060000", NOW + 60 * S),  # > 10**12: epoch ms
        ("1800000000001", NOW + 1),
    ],
)
def test_x_ratelimit_reset(value: str, expected: int) -> None:
    assert deadline(x_ratelimit_reset=value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "5000000",  # seconds from now, but 58 days: absurd
        "999999999",  # just under the epoch threshold: read as 31+ years from now
        "1700000000",  # epoch seconds in the past
        "1700000000000",  # epoch ms in the past
        "1900000000",  # epoch seconds, three years ahead
        "1900000000000",  # epoch ms, three years ahead
    ],
)
def test_x_ratelimit_reset_out_of_range_is_ignored(value: str) -> None:
    assert deadline(x_ratelimit_reset=value) is None


# -- malformed, past and absurd values --------------------------------------------------------

MALFORMED = [
    "",
    "   ",
    "soon",
    "-5",
    "+5",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "1e3",
    "1_000",
    "0x10",
    "1,5",
    "10 s",
    "١٢٠",  # Arabic-Indic digits: int() would take them, a header should not
    "9" * 1_000_000,
    "Fri, 32 Jan 2027 08:02:00 GMT",
    "Fri, 15 Jan 99999 08:02:00 GMT",
    "2027-13-40T08:01:00Z",
    "2027-01-15T08:01:00+25:00",
    "tomorrow",
]


@pytest.mark.parametrize(
    "name",
    [
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
    ],
)
@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_values_are_ignored(name: str, value: str) -> None:
    assert reset_deadline_from_headers({name: value}, NOW) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("retry-after", "0"),  # "now" is not a cooldown
        ("retry-after", "Fri, 15 Jan 2027 07:59:00 GMT"),
        ("retry-after", "Fri, 15 Jan 2027 08:00:00 GMT"),  # exactly now
        ("retry-after-ms", "0"),
        ("anthropic-ratelimit-requests-reset", "2027-01-15T07:59:59Z"),
        ("anthropic-ratelimit-tokens-reset", "2020-01-01T00:00:00Z"),
        ("x-ratelimit-reset", "0"),
    ],
)
def test_past_and_present_deadlines_are_ignored(name: str, value: str) -> None:
    assert reset_deadline_from_headers({name: value}, NOW) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("retry-after", "2678401"),
        ("retry-after", "99999999999999999999"),
        ("retry-after", "Mon, 15 Mar 2027 08:00:00 GMT"),
        ("retry-after-ms", "2678400001"),
        ("anthropic-ratelimit-tokens-reset", "2027-03-01T00:00:00Z"),
        ("anthropic-ratelimit-tokens-reset", "9999-12-31T23:59:59Z"),
    ],
)
def test_deadlines_beyond_31_days_are_ignored(name: str, value: str) -> None:
    assert reset_deadline_from_headers({name: value}, NOW) is None


def test_exactly_thirty_one_days_is_accepted() -> None:
    assert deadline(retry_after_ms=str(MAX_AHEAD_MS)) == NOW + MAX_AHEAD_MS
    assert deadline(retry_after_ms=str(MAX_AHEAD_MS + 1)) is None


def test_no_headers() -> None:
    assert reset_deadline_from_headers({}, NOW) is None
    assert reset_deadline_from_headers(None, NOW) is None
    assert reset_deadline_from_headers({"content-type": "application/json", "x-request-id": "42"}, NOW) is None


# -- case-insensitive lookup ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["retry-after", "Retry-After", "RETRY-AFTER", "rEtRy-AfTeR"])
def test_plain_dict_names_in_any_case(name: str) -> None:
    assert reset_deadline_from_headers({name: "45"}, NOW) == NOW + 45 * S


def test_mitmproxy_headers() -> None:
    headers = Headers(
        [
            (b"Retry-After", b"20"),
            (b"Anthropic-Ratelimit-Tokens-Reset", b"2027-01-15T08:00:40Z"),
        ]
    )
    assert reset_deadline_from_headers(headers, NOW) == NOW + 40 * S


def test_repeated_field_values_are_read_one_by_one() -> None:
    # Joined, they would read "Fri, 15 Jan ... GMT, 30": neither a number nor a date.
    headers = Headers([(b"retry-after", b"Fri, 15 Jan 2027 08:02:00 GMT"), (b"Retry-After", b"30")])
    assert reset_deadline_from_headers(headers, NOW) == NOW + 120 * S


def test_a_malformed_value_does_not_hide_a_good_one() -> None:
    headers = {"retry-after": "garbage", "x-ratelimit-reset": "nan", "retry-after-ms": "2500"}
    assert reset_deadline_from_headers(headers, NOW) == NOW + 2500


# -- several headers -------------------------------------------------------------------------

def test_the_latest_deadline_wins() -> None:
    headers = {
        "retry-after": "10",
        "x-ratelimit-reset": "90",
        "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:30Z",
        "anthropic-ratelimit-tokens-reset": "2027-01-15T08:01:15Z",
        "anthropic-ratelimit-input-tokens-reset": "2027-01-15T08:00:05Z",
        "anthropic-ratelimit-output-tokens-reset": "not a date",
    }
    assert reset_deadline_from_headers(headers, NOW) == NOW + 90 * S


def test_anthropic_reset_can_be_the_latest() -> None:
    headers = {"retry-after": "10", "anthropic-ratelimit-output-tokens-reset": "2027-01-15T08:05:00Z"}
    assert reset_deadline_from_headers(headers, NOW) == NOW + 300 * S


@pytest.mark.parametrize(
    ("retry_after", "retry_after_ms", "expected"),
    [
        ("2", "1500", NOW + 1500),  # agree within 1 s: the precise value
        ("2", "2000", NOW + 2000),
        ("2", "2900", NOW + 2900),
        ("1", "1", NOW + 1),  # 999 ms apart: still agreement
        ("3", "2000", NOW + 2000),  # exactly 1 s apart
        ("3", "1999", NOW + 3000),  # 1001 ms apart: disagree, the later wins
        ("10", "1500", NOW + 10 * S),
        ("1", "5000", NOW + 5000),
    ],
)
def test_retry_after_ms_refines_retry_after(retry_after: str, retry_after_ms: str, expected: int) -> None:
    assert deadline(retry_after=retry_after, retry_after_ms=retry_after_ms) == expected


def test_agreeing_retry_after_ms_does_not_hide_a_later_reset_header() -> None:
    headers = {"retry-after": "2", "retry-after-ms": "1500", "anthropic-ratelimit-tokens-reset": "2027-01-15T08:00:02Z"}
    assert reset_deadline_from_headers(headers, NOW) == NOW + 2000


def test_unusable_retry_after_ms_leaves_retry_after() -> None:
    assert deadline(retry_after="7", retry_after_ms="-1") == NOW + 7 * S


# -- later_deadline --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (None, None, None),
        (NOW, None, NOW),
        (None, NOW, NOW),
        (NOW, NOW + 1, NOW + 1),
        (NOW + 1, NOW, NOW + 1),
        (NOW, NOW, NOW),
        (0, None, 0),
    ],
)
def test_later_deadline(a: int | None, b: int | None, expected: int | None) -> None:
    assert later_deadline(a, b) == expected
