import json
from collections.abc import Callable

import pytest
from mitmproxy.http import Headers

from rotator.core import policy
from rotator.core.policy import (
    ACCESS_DENIED_COOLDOWN_MS,
    BILLING_CYCLE_COOLDOWN_MS,
    BODY_SCAN_LIMIT,
    CONCURRENCY_COOLDOWN_MS,
    FIVE_HOUR_COOLDOWN_MS,
    HEALTH_FAILURE,
    HEALTH_NEUTRAL,
    HEALTH_OVERLOADED,
    HEALTH_RATE_LIMITED,
    HEALTH_SUCCESS,
    MEMBERSHIP_COOLDOWN_MS,
    RATE_LIMIT_COOLDOWN_MS,
    RULES,
    WEEKLY_COOLDOWN_MS,
    Outcome,
    Verdict,
    Window,
    classify,
    classify_connection_error,
    normalise,
)
from tests.support.accounts import NOW

S = 1000
HOUR = 3600 * S
DAY = 24 * HOUR


def envelope(error_type: str, message: str) -> str:
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message}}, ensure_ascii=False)


def test_health_and_cooldown_numbers() -> None:
    # Other modules import these; the values are the TypeScript plugin's.
    assert (HEALTH_SUCCESS, HEALTH_RATE_LIMITED, HEALTH_FAILURE, HEALTH_OVERLOADED, HEALTH_NEUTRAL) == (
        2, -15, -20, -5, 0,
    )
    assert RATE_LIMIT_COOLDOWN_MS == 60 * S
    assert CONCURRENCY_COOLDOWN_MS == 10 * S
    assert ACCESS_DENIED_COOLDOWN_MS == 5 * 60 * S
    assert FIVE_HOUR_COOLDOWN_MS == 5 * HOUR
    assert WEEKLY_COOLDOWN_MS == 7 * DAY
    assert BILLING_CYCLE_COOLDOWN_MS == DAY
    assert MEMBERSHIP_COOLDOWN_MS == DAY
    assert BODY_SCAN_LIMIT == 64 * 1024


# -- every row of kimi-api.md's table -----------------------------------------------------

RATE_LIMITED = Outcome(Verdict.RATE_LIMITED, True, -15, NOW + 60 * S, False, None, "rate limited", False)
FIVE_HOUR = Outcome(
    Verdict.WINDOW_EXHAUSTED, True, -20, NOW + 5 * HOUR, False, Window.FIVE_HOUR, "5-hour usage limit reached", False
)
WEEKLY = Outcome(
    Verdict.WINDOW_EXHAUSTED, True, -20, NOW + 7 * DAY, False, Window.WEEKLY, "weekly usage limit reached", False
)
BILLING = Outcome(
    Verdict.WINDOW_EXHAUSTED, True, -20, NOW + DAY, False, Window.BILLING_CYCLE,
    "usage limit for this billing cycle reached", False,
)
CONCURRENCY = Outcome(
    Verdict.CONCURRENCY_LIMIT, True, -15, NOW + 10 * S, False, None, "concurrent request limit reached", False
)
MEMBERSHIP = Outcome(
    Verdict.MEMBERSHIP_INACTIVE, True, -20, NOW + DAY, False, None, "membership could not be verified", False
)
CLIENT_REJECTED = Outcome(
    Verdict.CLIENT_REJECTED, False, 0, None, False, None, "Kimi refused this client: it admits coding agents only",
    False,
)
BANNED = Outcome(
    Verdict.ACCOUNT_BANNED, True, -20, None, True, None, "account terminated under the Community Guidelines", False
)
KEY_INVALID = Outcome(Verdict.KEY_INVALID, True, -20, None, True, None, "key rejected as invalid", False)

TABLE = [
    (429, "rate_limit_error", "The engine is currently overloaded, please try again later", RATE_LIMITED),
    (429, "rate_limit_reached_error", "We're receiving too many requests at the moment. Please try again later.",
     RATE_LIMITED),
    (403, "access_terminated_error", "You've reached your 5-hour usage limit. Please try again later.", FIVE_HOUR),
    (403, "permission_error", "You've reached your 5-hour usage limit", FIVE_HOUR),
    (403, "access_terminated_error", "You've reached your weekly (7-day) usage limit. Upgrade your plan.", WEEKLY),
    (403, "permission_error", "You've reached your weekly (7-day) usage limit", WEEKLY),
    (403, "access_terminated_error", "You've reached your usage limit for this billing cycle.", BILLING),
    (403, "permission_error", "You've reached your monthly usage limit for this billing cycle", BILLING),
    (403, "access_terminated_error", "Your quota will be refreshed in the next cycle.", BILLING),
    (403, "permission_error", "You've reached your concurrent request limit. Please retry shortly.", CONCURRENCY),
    (402, "", "We're unable to verify your membership benefits at this time.", MEMBERSHIP),
    (402, "", "Please ensure your membership is active and try again.", MEMBERSHIP),
    (403, "access_terminated_error", "Kimi For Coding is currently only available for Coding Agents such as "
     "Kimi CLI, Claude Code, Roo Code, Kilo Code, etc.", CLIENT_REJECTED),
    (403, "access_terminated_error", "Access terminated. Review our Community Guidelines.", BANNED),
    (403, "permission_error", "Access terminated. Review our Community Guidelines", BANNED),
    (401, "authentication_error", "Invalid Authentication", KEY_INVALID),
    (401, "invalid_authentication_error", "Invalid Authentication", KEY_INVALID),
    (401, "incorrect_api_key_error", "Incorrect API key provided", KEY_INVALID),
]

CURLIES = ["\u2019", "\u2018", "\u02bc"]
VARIANTS: dict[str, Callable[[str], str]] = {
    "as-is": lambda m: m,
    "upper": str.upper,
    "lower": str.lower,
    **{f"curly-{ord(c):04x}": (lambda m, c=c: m.replace("'", c)) for c in CURLIES},
    "spaced": lambda m: m.replace(" ", "  \n\t"),
}


@pytest.mark.parametrize(("status", "error_type", "message", "expected"), TABLE)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
def test_kimi_table(
    status: int, error_type: str, message: str, expected: Outcome, variant: str, as_bytes: bool
) -> None:
    text = envelope(error_type, VARIANTS[variant](message))
    body: bytes | str = text.encode() if as_bytes else text
    assert classify(status, {}, body, NOW) == expected


@pytest.mark.parametrize(("status", "error_type", "message", "expected"), TABLE)
def test_kimi_table_as_plain_text(status: int, error_type: str, message: str, expected: Outcome) -> None:
    assert classify(status, {}, message.encode(), NOW) == expected


@pytest.mark.parametrize("status", [400, 403, 429, 500, 503, 529])
@pytest.mark.parametrize(
    ("message", "verdict", "window"),
    [
        ("You've reached your weekly (7-day) usage limit", Verdict.WINDOW_EXHAUSTED, Window.WEEKLY),
        ("You've reached your 5-hour usage limit", Verdict.WINDOW_EXHAUSTED, Window.FIVE_HOUR),
        ("Your quota will be refreshed in the next cycle", Verdict.WINDOW_EXHAUSTED, Window.BILLING_CYCLE),
        ("You've reached your concurrent request limit", Verdict.CONCURRENCY_LIMIT, None),
        ("The engine is currently overloaded, please try again later", Verdict.RATE_LIMITED, None),
        ("Kimi For Coding is currently only available for Coding Agents", Verdict.CLIENT_REJECTED, None),
        ("Access terminated. Review our Community Guidelines", Verdict.ACCOUNT_BANNED, None),
        ("Incorrect API key provided", Verdict.KEY_INVALID, None),
        ("Please ensure your membership is active", Verdict.MEMBERSHIP_INACTIVE, None),
    ],
)
def test_wording_wins_over_status(status: int, message: str, verdict: Verdict, window: Window | None) -> None:
    outcome = classify(status, {}, envelope("rate_limit_error", message), NOW)
    assert (outcome.verdict, outcome.window) == (verdict, window)


@pytest.mark.parametrize(
    ("message", "window"),
    [
        ("You've reached your 5-hour usage limit; your weekly limit resets Monday", Window.FIVE_HOUR),
        ("You've reached your weekly usage limit and your 5-hour limit", Window.FIVE_HOUR),
        ("Weekly usage limit reached for this billing cycle", Window.BILLING_CYCLE),
    ],
)
def test_several_windows_named_the_shortest_wins(message: str, window: Window) -> None:
    assert classify(403, {}, envelope("permission_error", message), NOW).window is window


def test_a_limit_message_that_says_access_terminated_cools_instead_of_disabling() -> None:
    body = envelope("access_terminated_error", "Access terminated: you've reached your 5-hour usage limit")
    assert classify(403, {}, body, NOW) == FIVE_HOUR


def test_coding_agents_text_is_not_a_ban_even_with_access_terminated() -> None:
    body = envelope("access_terminated_error", "Access terminated. Kimi For Coding is only available for Coding Agents")
    assert classify(403, {}, body, NOW) == CLIENT_REJECTED


# -- success -------------------------------------------------------------------------------

SUCCESS = Outcome(Verdict.SUCCESS, False, 2, None, False, None, "ok", True)


@pytest.mark.parametrize("status", [200, 201, 204, 206, 299, 301, 302, 304, 307, 399])
@pytest.mark.parametrize(
    "body",
    [None, b"", '{"id":"msg_1","type":"message","content":[]}', b"data: {}\n\n",
     # A model's answer may quote an error's wording; a 200 is still a success.
     '{"content":[{"type":"text","text":"Too many requests? Access terminated. 5-hour usage limit"}]}'],
)
def test_success(status: int, body: bytes | str | None) -> None:
    assert classify(status, {}, body, NOW) == SUCCESS


def test_success_ignores_reset_headers() -> None:
    # Anthropic-shaped servers send reset headers on every answer.
    headers = {"retry-after": "30", "anthropic-ratelimit-tokens-reset": "2027-01-15T08:01:00Z"}
    assert classify(200, headers, b"{}", NOW) == SUCCESS


# -- statuses without known wording ----------------------------------------------------------

UNKNOWN_BODIES: list[bytes | str | None] = [
    None,
    b"",
    "",
    "   \n",
    envelope("permission_error", "Something we have never seen"),
    b"<html><body><h1>Error</h1></body></html>",
    b"\xff\xfe\xfd not utf-8",
    "{}",
    "[]",
    "null",
    '"a json string"',
    "{not json",
]


@pytest.mark.parametrize("body", UNKNOWN_BODIES)
@pytest.mark.parametrize(
    ("status", "verdict", "health", "cooldown", "retry", "disable"),
    [
        (401, Verdict.KEY_INVALID, -20, None, True, True),
        (402, Verdict.MEMBERSHIP_INACTIVE, -20, NOW + DAY, True, False),
        (403, Verdict.ACCESS_DENIED, -20, NOW + 5 * 60 * S, True, False),
        (429, Verdict.RATE_LIMITED, -15, NOW + 60 * S, True, False),
        (400, Verdict.REQUEST_ERROR, 0, None, False, False),
        (404, Verdict.REQUEST_ERROR, 0, None, False, False),
        (405, Verdict.REQUEST_ERROR, 0, None, False, False),
        (408, Verdict.REQUEST_ERROR, 0, None, False, False),
        (413, Verdict.REQUEST_ERROR, 0, None, False, False),
        (422, Verdict.REQUEST_ERROR, 0, None, False, False),
        (499, Verdict.REQUEST_ERROR, 0, None, False, False),
        (500, Verdict.UPSTREAM_FAULT, -20, None, False, False),
        (501, Verdict.UPSTREAM_FAULT, -20, None, False, False),
        (502, Verdict.UPSTREAM_FAULT, -20, None, False, False),
        (504, Verdict.UPSTREAM_FAULT, -20, None, False, False),
        (520, Verdict.UPSTREAM_FAULT, -20, None, False, False),
        (503, Verdict.UPSTREAM_FAULT, -5, None, False, False),
        (529, Verdict.UPSTREAM_FAULT, -5, None, False, False),
        (100, Verdict.UPSTREAM_FAULT, -20, None, False, False),
        (600, Verdict.UPSTREAM_FAULT, -20, None, False, False),
    ],
)
def test_unknown_wording_by_status(
    body: bytes | str | None,
    status: int,
    verdict: Verdict,
    health: int,
    cooldown: int | None,
    retry: bool,
    disable: bool,
) -> None:
    outcome = classify(status, {}, body, NOW)
    assert (outcome.verdict, outcome.health_delta, outcome.cooldown_until_ms) == (verdict, health, cooldown)
    assert (outcome.retry_elsewhere, outcome.disable, outcome.window, outcome.counts_as_success) == (
        retry, disable, None, False,
    )


@pytest.mark.parametrize("status", [500, 503, 529])
@pytest.mark.parametrize("error_type", ["api_error", "overloaded_error"])
def test_upstream_faults_with_anthropic_bodies(status: int, error_type: str) -> None:
    outcome = classify(status, {}, envelope(error_type, "Overloaded" if status != 500 else "Internal server error"), NOW)
    assert outcome.verdict is Verdict.UPSTREAM_FAULT
    assert outcome.health_delta == (-20 if status == 500 else -5)
    assert outcome.cooldown_until_ms is None
    assert outcome.retry_elsewhere is False


def test_error_type_alone_is_not_wording() -> None:
    # access_terminated_error also carries window and client messages: only text decides.
    body = envelope("access_terminated_error", "Something new happened")
    assert classify(403, {}, body, NOW).verdict is Verdict.ACCESS_DENIED
    assert classify(400, {}, envelope("rate_limit_error", "bad request"), NOW).verdict is Verdict.REQUEST_ERROR


# -- body shapes -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "We're receiving too many requests"}},
        {"error": {"type": "rate_limit_reached_error", "message": "We're receiving too many requests", "code": None}},
        {"message": "We're receiving too many requests"},
        {"detail": "We're receiving too many requests"},
        {"error": "We're receiving too many requests"},
        {"status": 400, "msg": "We're receiving too many requests"},  # no known field: searched whole
    ],
)
def test_json_shapes(body: dict[str, object]) -> None:
    assert classify(400, {}, json.dumps(body), NOW).verdict is Verdict.RATE_LIMITED


def test_only_the_message_is_searched_when_there_is_one() -> None:
    body = json.dumps({"error": {"type": "invalid_request_error", "message": "max_tokens too large"},
                       "hint": "too many requests"})
    assert classify(400, {}, body, NOW).verdict is Verdict.REQUEST_ERROR


def test_escaped_unicode_apostrophes_in_json() -> None:
    body = json.dumps({"type": "error", "error": {"type": "permission_error",
                       "message": "You\u2019ve reached your weekly (7\u2011day) usage limit"}})
    assert "\\u2019" in body and "\\u2011" in body  # ASCII-escaped on the wire
    assert classify(403, {}, body, NOW) == WEEKLY


def test_invalid_utf8_around_the_message() -> None:
    body = b"\xff\xfe" + envelope("permission_error", "You've reached your 5-hour usage limit").encode() + b"\xc3"
    assert classify(403, {}, body, NOW) == FIVE_HOUR


def test_bom_before_json() -> None:
    body = "\ufeff" + envelope("permission_error", "Something else entirely")
    outcome = classify(403, {}, body.encode(), NOW)
    assert outcome.reason == "HTTP 403 with an unrecognised message: permission_error: Something else entirely"


@pytest.mark.parametrize("as_bytes", [False, True])
def test_only_the_first_64_kib_is_read(as_bytes: bool) -> None:
    late = "x" * BODY_SCAN_LIMIT + " too many requests"
    early = "x" * (BODY_SCAN_LIMIT - 40) + " too many requests" + "x" * 100_000
    body_late: bytes | str = late.encode() if as_bytes else late
    body_early: bytes | str = early.encode() if as_bytes else early
    assert classify(400, {}, body_late, NOW).verdict is Verdict.REQUEST_ERROR
    assert classify(400, {}, body_early, NOW).verdict is Verdict.RATE_LIMITED


def test_truncated_json_is_searched_as_text() -> None:
    body = '{"error":{"message":"You\'ve reached your 5-hour usage limit","pad":"' + "y" * 100_000 + '"}}'
    assert classify(403, {}, body, NOW) == FIVE_HOUR


@pytest.mark.parametrize(
    "body",
    ["[" * 50_000, '{"a":' * 20_000, b"\x00" * 10, "{" + "\ud800", bytearray(b"too many requests"),
     json.dumps({"error": {"message": 42, "type": ["x"]}, "detail": [{"msg": "bad"}]})],
)
def test_odd_bodies_never_raise(body: bytes | str) -> None:
    assert isinstance(classify(403, {}, body, NOW), Outcome)


# -- deadlines from headers ------------------------------------------------------------------

OVERLOADED = envelope("rate_limit_error", "The engine is currently overloaded, please try again later")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, NOW + 60 * S),
        ({"retry-after": "5"}, NOW + 5 * S),  # the server's word wins even when shorter
        ({"Retry-After": "600"}, NOW + 600 * S),
        ({"retry-after-ms": "2500"}, NOW + 2500),
        ({"retry-after": "Fri, 15 Jan 2027 08:02:00 GMT"}, NOW + 120 * S),
        ({"anthropic-ratelimit-requests-reset": "2027-01-15T08:00:30Z"}, NOW + 30 * S),
        ({"x-ratelimit-reset": "1800000090"}, NOW + 90 * S),
        ({"retry-after": "garbage"}, NOW + 60 * S),
        ({"retry-after": "0"}, NOW + 60 * S),
        ({"retry-after": str(40 * 24 * 3600)}, NOW + 60 * S),  # absurd: ignored
    ],
)
def test_rate_limit_cooldown_follows_headers(headers: dict[str, str], expected: int) -> None:
    assert classify(429, headers, OVERLOADED, NOW).cooldown_until_ms == expected
    assert classify(429, headers, b"", NOW).cooldown_until_ms == expected


def test_mitmproxy_headers_object() -> None:
    headers = Headers([(b"Retry-After", b"12")])
    assert classify(429, headers, OVERLOADED, NOW).cooldown_until_ms == NOW + 12 * S


@pytest.mark.parametrize(
    ("status", "message", "headers", "expected"),
    [
        # Other cooldowns only lengthen: a later header wins, an earlier one does not.
        (403, "You've reached your 5-hour usage limit", {"retry-after": "30"}, NOW + 5 * HOUR),
        (403, "You've reached your 5-hour usage limit", {"x-ratelimit-reset": "1800021600"}, NOW + 6 * HOUR),
        (403, "You've reached your weekly (7-day) usage limit", {"retry-after": "3600"}, NOW + 7 * DAY),
        (403, "You've reached your weekly (7-day) usage limit", {"retry-after": str(8 * 24 * 3600)}, NOW + 8 * DAY),
        (403, "Your quota will be refreshed in the next cycle", {"retry-after": str(2 * 24 * 3600)}, NOW + 2 * DAY),
        (403, "You've reached your concurrent request limit", {"retry-after": "2"}, NOW + 10 * S),
        (403, "You've reached your concurrent request limit", {"retry-after": "30"}, NOW + 30 * S),
        (402, "Please ensure your membership is active", {"retry-after": "60"}, NOW + DAY),
        (403, "A brand new refusal", {"retry-after": "900"}, NOW + 15 * 60 * S),
        (403, "A brand new refusal", {"retry-after": "60"}, NOW + 5 * 60 * S),
        # No cooldown stays no cooldown, whatever the headers say.
        (503, "Service unavailable", {"retry-after": "30"}, None),
        (529, "Overloaded", {"retry-after": "30"}, None),
        (500, "Internal error", {"retry-after": "30"}, None),
        (401, "Invalid Authentication", {"retry-after": "30"}, None),
        (403, "Access terminated. Review our Community Guidelines", {"retry-after": "30"}, None),
        (403, "only available for Coding Agents", {"retry-after": "30"}, None),
        (400, "bad request", {"retry-after": "30"}, None),
    ],
)
def test_header_deadlines_against_defaults(
    status: int, message: str, headers: dict[str, str], expected: int | None
) -> None:
    assert classify(status, headers, envelope("error", message), NOW).cooldown_until_ms == expected


# -- reasons ----------------------------------------------------------------------------------

def test_fallback_reasons_quote_kimi() -> None:
    assert classify(403, {}, envelope("permission_error", "New  rule\napplies"), NOW).reason == (
        "HTTP 403 with an unrecognised message: permission_error: New rule applies"
    )
    assert classify(500, {}, b"", NOW).reason == "Kimi server error (HTTP 500)"
    assert classify(529, {}, b"", NOW).reason == "Kimi overloaded (HTTP 529)"
    assert classify(404, {}, "not found", NOW).reason == "request refused (HTTP 404): not found"
    assert classify(402, {}, None, NOW).reason == "HTTP 402: membership or payment required"


def test_fallback_reasons_hide_keys_and_stay_short() -> None:
    body = envelope("authentication_error", "Key sk-kimi-AbCdEf0123456789xyz is not allowed here " + "z" * 500)
    reason = classify(401, {}, body, NOW).reason
    assert "AbCdEf" not in reason
    assert reason.startswith("HTTP 401: key not accepted: authentication_error: Key sk-kim…9xyz is not allowed here zz")
    assert reason.endswith("…")
    assert len(reason) <= len("HTTP 401: key not accepted: authentication_error: ") + policy.REASON_DETAIL_CHARS


def test_connection_error() -> None:
    assert classify_connection_error("Connection refused", NOW) == Outcome(
        Verdict.UPSTREAM_FAULT, False, -20, None, False, None, "connection to Kimi failed: Connection refused", False
    )
    assert classify_connection_error("", NOW).reason == "connection to Kimi failed"
    assert classify_connection_error("timed out\n  after 30 s", NOW).reason == (
        "connection to Kimi failed: timed out after 30 s"
    )


# -- the table itself -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("You\u2019ve", "you've"),
        ("You\u2018ve", "you've"),
        ("You\u02bcve", "you've"),
        ("WEEKLY  (7\u2011DAY)\n usage\tLIMIT", "weekly (7-day) usage limit"),
        ("5\u2013hour", "5-hour"),
        ("  padded  ", "padded"),
    ],
)
def test_normalise(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


def test_phrases_are_written_in_normalised_form() -> None:
    # A phrase with capitals or curly quotes could never match.
    for rule in RULES:
        for phrase in rule.phrases:
            assert normalise(phrase) == phrase, phrase


def test_table_shape() -> None:
    assert RULES[0].verdict is Verdict.SUCCESS
    assert RULES[-1].statuses is None and RULES[-1].phrases == ()
    for rule in RULES:
        assert (rule.window is not None) == (rule.verdict is Verdict.WINDOW_EXHAUSTED), rule
        assert not (rule.disable and rule.cooldown_ms is not None), rule
        assert rule.disable == (rule.verdict in (Verdict.KEY_INVALID, Verdict.ACCOUNT_BANNED)), rule
        if rule.verdict in (Verdict.CLIENT_REJECTED, Verdict.REQUEST_ERROR, Verdict.UPSTREAM_FAULT):
            assert not rule.retry_elsewhere and rule.cooldown_ms is None, rule


@pytest.mark.parametrize("message", ["Client disconnected.", "stream reset by client (CANCEL)",
                                     "stream reset by client (NO_ERROR)", "killed"])
def test_a_client_hanging_up_is_not_the_keys_fault(message):
    outcome = classify_connection_error(message, NOW)
    assert outcome.verdict is Verdict.CLIENT_GONE
    assert (outcome.health_delta, outcome.counts_as_success, outcome.retry_elsewhere) == (0, False, False)
    assert outcome.cooldown_until_ms is None and not outcome.disable


def test_a_client_hanging_up_on_a_started_success_counts_as_success():
    outcome = classify_connection_error("Client disconnected.", NOW, answered_status=200)
    assert outcome.verdict is Verdict.SUCCESS and outcome.counts_as_success


def test_a_closed_client_connection_is_the_clients_doing_whatever_the_words():
    # A streamed upload cut short by the client reads as mitmproxy's incomplete-body error.
    message = "peer closed connection without sending complete message body (received 2000 bytes, expected 5000)"
    assert classify_connection_error(message, NOW).verdict is Verdict.UPSTREAM_FAULT
    assert classify_connection_error(message, NOW, client_left=True).verdict is Verdict.CLIENT_GONE


def test_upstream_breaking_mid_answer_is_still_a_failure():
    outcome = classify_connection_error("Server disconnected.", NOW, answered_status=200)
    assert outcome.verdict is Verdict.UPSTREAM_FAULT and outcome.health_delta == -20
