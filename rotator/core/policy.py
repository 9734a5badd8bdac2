"""What a Kimi response means for the key that earned it: one table, read top down.

`RULES` is the whole policy. Each row names the statuses it applies to (None: any) and
the phrases it looks for (empty: any message); the first row that matches decides. Why
a row says what it says, and sits where it sits, is written beside it; what each verdict
does to a key, as a person sees it, is the README's table ("What a response means").
Reading the body (`read_error`), the cooldown (`_cooldown`) and the reason (`_reason`)
say their own rules where they are made.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rotator.core.reset_times import MAX_AHEAD_MS, later_deadline, reset_deadline_from_headers
from rotator.core.text import REASON_MOST, cap, clean_line

# Health points per outcome: the TypeScript plugin's numbers, plus a small penalty for
# overload so that a key seeing many of them still drifts down.
HEALTH_SUCCESS = 2
HEALTH_RATE_LIMITED = -15
HEALTH_FAILURE = -20
HEALTH_OVERLOADED = -5
HEALTH_NEUTRAL = 0

SECOND_MS = 1000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

# Used when no response header announces a later reset.
RATE_LIMIT_COOLDOWN_MS = 60 * SECOND_MS  # the plugin's default when retry-after is absent
CONCURRENCY_COOLDOWN_MS = 10 * SECOND_MS  # in-flight requests finish within seconds
ACCESS_DENIED_COOLDOWN_MS = 5 * MINUTE_MS
# A window's worst case: it reset at most this long after the request that exhausted it.
# The caller may shorten it from /coding/v1/usages, which knows the exact time.
FIVE_HOUR_COOLDOWN_MS = 5 * HOUR_MS
WEEKLY_COOLDOWN_MS = 7 * DAY_MS
# The plugin waited for local midnight; a fixed day is deterministic, independent of
# the machine's zone, and the usages endpoint can still bring it forward.
BILLING_CYCLE_COOLDOWN_MS = 1 * DAY_MS
MEMBERSHIP_COOLDOWN_MS = 1 * DAY_MS

BODY_SCAN_LIMIT = 64 * 1024  # error bodies are small; a huge body is not worth reading whole
REASON_DETAIL_CHARS = 120  # of Kimi's message, quoted in a reason
REASON_TYPE_CHARS = 60  # of Kimi's error.type, quoted in a reason


class Verdict(enum.Enum):
    SUCCESS = "success"
    RATE_LIMITED = "rate_limited"
    WINDOW_EXHAUSTED = "window_exhausted"
    CONCURRENCY_LIMIT = "concurrency_limit"
    MEMBERSHIP_INACTIVE = "membership_inactive"
    KEY_INVALID = "key_invalid"
    ACCOUNT_BANNED = "account_banned"
    ACCESS_DENIED = "access_denied"  # 403 with wording this table does not know
    CLIENT_REJECTED = "client_rejected"
    UPSTREAM_FAULT = "upstream_fault"
    REQUEST_ERROR = "request_error"
    CLIENT_GONE = "client_gone"  # the client hung up; says nothing about the key


class Window(enum.Enum):
    FIVE_HOUR = "five_hour"
    WEEKLY = "weekly"
    BILLING_CYCLE = "billing_cycle"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one response does to its key. Only SUCCESS counts as a success;
    CLIENT_REJECTED and REQUEST_ERROR are neutral."""

    verdict: Verdict
    retry_elsewhere: bool  # the key's fault, not the request's: resend with another key
    health_delta: int
    cooldown_until_ms: int | None  # absolute deadline; None: no cooldown
    disable: bool  # until a person re-enables the key
    window: Window | None  # for WINDOW_EXHAUSTED
    reason: str  # for logs and list-keys
    counts_as_success: bool


@dataclass(frozen=True, slots=True)
class Rule:
    statuses: frozenset[int] | None  # None: any status
    phrases: tuple[str, ...]  # lower-case, normalised; empty: any message
    verdict: Verdict
    reason: str  # may use {status}
    health: int
    cooldown_ms: int | None = None
    retry_elsewhere: bool = False
    disable: bool = False
    window: Window | None = None


def _statuses(*codes: int | range) -> frozenset[int]:
    found: set[int] = set()
    for code in codes:
        found.update(code if isinstance(code, range) else (code,))
    return frozenset(found)


# Wording is checked before bare statuses because Kimi varies both status and
# `error.type` for the same condition (the weekly-limit text has come with 403 and 429),
# while the sentence itself stays put. Both of Kimi's envelopes read alike (see
# `read_error`); the OpenAI-shaped one (/v1/chat/completions, and Moonshot's platform)
# brings wording of its own, in the rows below that quote it.
RULES: tuple[Rule, ...] = (
    # 2xx/3xx are settled first, by status alone, so a model's answer that happens to
    # quote "too many requests" is never read as an error.
    Rule(_statuses(range(200, 400)), (), Verdict.SUCCESS, "ok", HEALTH_SUCCESS),
    # Every key would be refused the same way, so rotating only burns the pool.
    Rule(None, ("only available for coding agents",),
         Verdict.CLIENT_REJECTED, "Kimi refused this client: it admits coding agents only", HEALTH_NEUTRAL),
    Rule(None, ("unable to verify your membership", "membership benefits", "membership is active"),
         Verdict.MEMBERSHIP_INACTIVE, "membership could not be verified", HEALTH_FAILURE,
         MEMBERSHIP_COOLDOWN_MS, retry_elsewhere=True),
    # The OpenAI-shaped endpoints' exceeded_current_quota_error ("You exceeded your
    # current token quota", "please check your account balance"): the account is out of
    # balance or token quota, which no retry on this key can fix; read as a membership
    # problem, a day's rest, since retrying cannot top an account up.
    Rule(None, ("exceeded your current quota", "exceeded your current token quota", "insufficient balance",
                "check your account balance"),
         Verdict.MEMBERSHIP_INACTIVE, "account out of balance or token quota", HEALTH_FAILURE,
         MEMBERSHIP_COOLDOWN_MS, retry_elsewhere=True),
    # The plan's windows. When a message names several, the shortest wins (these rows
    # are in that order: 5-hour, then billing cycle, then weekly): a guess too short costs
    # one failed request later, a guess too long idles a good key for days. "Your usage
    # limit for this period" names no window: the shortest is assumed.
    Rule(None, ("5-hour usage limit", "5-hour limit", "5 hour usage limit", "5 hour limit",
                "usage limit for this period"),
         Verdict.WINDOW_EXHAUSTED, "5-hour usage limit reached", HEALTH_FAILURE,
         FIVE_HOUR_COOLDOWN_MS, retry_elsewhere=True, window=Window.FIVE_HOUR),
    Rule(None, ("billing cycle", "refreshed in the next cycle", "monthly usage limit"),
         Verdict.WINDOW_EXHAUSTED, "usage limit for this billing cycle reached", HEALTH_FAILURE,
         BILLING_CYCLE_COOLDOWN_MS, retry_elsewhere=True, window=Window.BILLING_CYCLE),
    Rule(None, ("weekly (7-day) usage limit", "weekly usage limit", "weekly limit",
                "7-day usage limit", "7-day limit"),
         Verdict.WINDOW_EXHAUSTED, "weekly usage limit reached", HEALTH_FAILURE,
         WEEKLY_COOLDOWN_MS, retry_elsewhere=True, window=Window.WEEKLY),
    # "request reached organization max concurrency" is the OpenAI-shaped wording.
    Rule(None, ("concurrent request limit", "concurrency limit", "too many concurrent requests",
                "max concurrency", "organization concurrency"),
         Verdict.CONCURRENCY_LIMIT, "concurrent request limit reached", HEALTH_RATE_LIMITED,
         CONCURRENCY_COOLDOWN_MS, retry_elsewhere=True),
    # After every row of wording specific to one condition (membership, windows,
    # concurrency): a limit message that happens to use these words then cools the key
    # instead of disabling it until a person steps in.
    Rule(None, ("community guidelines", "access terminated"),
         Verdict.ACCOUNT_BANNED, "account terminated under the Community Guidelines", HEALTH_FAILURE,
         retry_elsewhere=True, disable=True),
    Rule(None, ("invalid authentication", "incorrect api key", "invalid api key",
                "api key appears to be invalid"),
         Verdict.KEY_INVALID, "key rejected as invalid", HEALTH_FAILURE,
         retry_elsewhere=True, disable=True),
    # "max rpm" and the "rpm/tpm/tpd rate limit"s are the OpenAI-shaped organisation limits.
    Rule(None, ("engine is currently overloaded", "too many requests", "rate limit reached",
                "rate limit exceeded", "max rpm", "max tpm", "rpm rate limit", "tpm rate limit", "tpd rate limit"),
         Verdict.RATE_LIMITED, "rate limited", HEALTH_RATE_LIMITED,
         RATE_LIMIT_COOLDOWN_MS, retry_elsewhere=True),
    # Statuses whose wording matched nothing above.
    Rule(_statuses(401), (), Verdict.KEY_INVALID, "HTTP 401: key not accepted", HEALTH_FAILURE,
         retry_elsewhere=True, disable=True),
    Rule(_statuses(402), (), Verdict.MEMBERSHIP_INACTIVE, "HTTP 402: membership or payment required",
         HEALTH_FAILURE, MEMBERSHIP_COOLDOWN_MS, retry_elsewhere=True),
    # A key fault of unknown kind: retried elsewhere, and a 5-minute cooldown, short
    # enough that a transient refusal costs little, long enough not to hammer a key that
    # is refused for good.
    Rule(_statuses(403), (), Verdict.ACCESS_DENIED, "HTTP 403 with an unrecognised message",
         HEALTH_FAILURE, ACCESS_DENIED_COOLDOWN_MS, retry_elsewhere=True),
    Rule(_statuses(429), (), Verdict.RATE_LIMITED, "HTTP 429: rate limited", HEALTH_RATE_LIMITED,
         RATE_LIMIT_COOLDOWN_MS, retry_elsewhere=True),
    # Upstream faults (5xx, 529) never retry elsewhere: the request may already have been
    # processed, clients' SDKs retry 5xx themselves, and resending on every key would
    # multiply load on a struggling server. 503/529 are overload, not the key: -5 and no
    # cooldown, so one busy moment cannot bench the whole pool.
    Rule(_statuses(503, 529), (), Verdict.UPSTREAM_FAULT, "Kimi overloaded (HTTP {status})", HEALTH_OVERLOADED),
    Rule(_statuses(range(500, 600)), (), Verdict.UPSTREAM_FAULT, "Kimi server error (HTTP {status})",
         HEALTH_FAILURE),
    # The request's own fault (400, 404, 413, 422...): the client should see it as is.
    Rule(_statuses(range(400, 500)), (), Verdict.REQUEST_ERROR, "request refused (HTTP {status})",
         HEALTH_NEUTRAL),
    Rule(None, (), Verdict.UPSTREAM_FAULT, "unexpected HTTP status {status}", HEALTH_FAILURE),
)


def classify(
    status: int, headers: Mapping[str, str] | None, body: bytes | str | None, now_ms: int
) -> Outcome:
    """The outcome of one upstream response for the key that was used."""
    if 200 <= status < 400:
        return _SUCCESS  # decided by status alone: a success body is never read
    message = read_error(body)
    rule = find_rule(status, message.match_text)
    return Outcome(
        verdict=rule.verdict,
        retry_elsewhere=rule.retry_elsewhere,
        health_delta=rule.health,
        cooldown_until_ms=_cooldown(rule, headers, now_ms, message.match_text),
        disable=rule.disable,
        window=rule.window,
        reason=_reason(rule, status, message),
        counts_as_success=rule.verdict is Verdict.SUCCESS,
    )


def _no_cooldown(verdict: Verdict, health_delta: int, reason: str) -> Outcome:
    """An outcome that neither cools, disables nor retries: it only counts."""
    return Outcome(
        verdict=verdict,
        retry_elsewhere=False,
        health_delta=health_delta,
        cooldown_until_ms=None,
        disable=False,
        window=None,
        reason=reason,
        counts_as_success=verdict is Verdict.SUCCESS,
    )


_SUCCESS = _no_cooldown(Verdict.SUCCESS, HEALTH_SUCCESS, RULES[0].reason)

# mitmproxy's words when the client, not Kimi, ended the exchange: HTTP/1 clients
# closing, HTTP/2 clients resetting a stream (whatever the code), a person killing it.
CLIENT_GONE_PHRASES = ("client disconnected", "stream reset by client", "killed")


def classify_connection_error(
    message: str, now_ms: int, answered_status: int | None = None, *, client_left: bool = False
) -> Outcome:
    """An exchange that ended without a complete response.

    The client hanging up is nobody's fault (`client_left`: its connection closed, which
    mitmproxy's words alone don't always tell, e.g. a streamed upload cut short reads as
    an incomplete message body either way); if Kimi had already begun a successful
    answer, the key did its job. Otherwise a refused, reset or timed-out upstream
    connection is a failure, not retried: the request may have reached Kimi before the
    connection broke, so resending it could run it twice; the client decides.
    """
    detail = _quote(str(message), REASON_DETAIL_CHARS)
    if client_left or any(phrase in detail.casefold() for phrase in CLIENT_GONE_PHRASES):
        if answered_status is not None and 200 <= answered_status < 400:
            return _SUCCESS
        return _no_cooldown(Verdict.CLIENT_GONE, HEALTH_NEUTRAL, f"the client ended the request: {detail}")
    reason = f"connection to Kimi failed: {detail}" if detail else "connection to Kimi failed"
    return _no_cooldown(Verdict.UPSTREAM_FAULT, HEALTH_FAILURE, reason)


def find_rule(status: int, match_text: str) -> Rule:
    """The first row of RULES that matches; `match_text` as `normalise` returns it."""
    for rule in RULES:
        if rule.statuses is not None and status not in rule.statuses:
            continue
        if rule.phrases and not any(phrase in match_text for phrase in rule.phrases):
            continue
        return rule
    raise AssertionError("RULES ends with a row that matches everything")  # pragma: no cover


# -- reading the body ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ErrorText:
    text: str  # message(s) as sent, as one clean line (`text.clean_line`), for people
    match_text: str  # normalised, for phrase matching
    error_type: str | None


_APOSTROPHES = {ord(c): "'" for c in "\u2019\u2018\u02bc\u2032"}
_HYPHENS = {ord(c): "-" for c in "\u2010\u2011\u2012\u2013"}
_NORMALISE = {**_APOSTROPHES, **_HYPHENS}


def normalise(text: str) -> str:
    """Lower-case, straight apostrophes and hyphens, single spaces: the form phrases use."""
    return _collapse(text.translate(_NORMALISE)).casefold()


def read_error(body: bytes | bytearray | memoryview | str | None) -> ErrorText:
    """The error message(s) and type in a response body; never raises.

    Phrases are matched in the error message(s) of a JSON body; a body that is not JSON,
    or JSON without a message field, is searched whole. Both of Kimi's envelopes read
    alike: Anthropic's (`{"type":"error","error":{"type","message"}}`, /v1/messages) and
    OpenAI's (`{"error":{"message","type","code"}}`, /v1/chat/completions)."""
    text = _decode(body)
    parsed = _parse_json(text)
    messages = _messages(parsed) if isinstance(parsed, dict) else []
    error_type = _error_type(parsed) if isinstance(parsed, dict) else None
    shown = _quote(" | ".join(messages) if messages else text, BODY_SCAN_LIMIT)
    return ErrorText(text=shown, match_text=normalise(shown), error_type=error_type)


def _decode(body: bytes | bytearray | memoryview | str | None) -> str:
    if body is None:
        return ""
    if isinstance(body, str):
        return body[:BODY_SCAN_LIMIT]
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body[:BODY_SCAN_LIMIT]).decode("utf-8", errors="replace")
    return ""


def _parse_json(text: str) -> Any:
    text = text.lstrip("\ufeff \t\r\n")
    if not text.startswith("{"):
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _messages(document: dict[str, Any]) -> list[str]:
    error = document.get("error")
    candidates = [
        error.get("message") if isinstance(error, dict) else error,
        document.get("message"),
        document.get("detail"),
    ]
    return [c for c in candidates if isinstance(c, str) and c.strip()]


def _error_type(document: dict[str, Any]) -> str | None:
    error = document.get("error")
    found = error.get("type") if isinstance(error, dict) else None
    return found if isinstance(found, str) and found.strip() else None


# -- composing the outcome ---------------------------------------------------------------

def _cooldown(rule: Rule, headers: Mapping[str, str] | None, now_ms: int, match_text: str = "") -> int | None:
    # Rate limits use the server's announced reset when there is one, even if shorter
    # than the default (the server knows); every other cooldown takes the later of its
    # default and any announced reset; verdicts without a cooldown ignore reset headers
    # (Anthropic-shaped servers send them on every success). A refusal that says when to
    # come back in its words ("please try again after 3 seconds") is read like a
    # `retry-after` header when no header announces a reset.
    if rule.cooldown_ms is None:
        return None
    announced = reset_deadline_from_headers(headers, now_ms)
    if announced is None:
        announced = deadline_in_words(match_text, now_ms)
    if rule.verdict is Verdict.RATE_LIMITED and announced is not None:
        return announced
    return later_deadline(now_ms + rule.cooldown_ms, announced)


# "please try again after 3 seconds", "try again in 1.5 s", "retry after 20 seconds".
_WAIT_IN_WORDS = re.compile(r"(?:try again|retry) (?:after|in) ([0-9]{1,7}(?:\.[0-9]{1,3})?) ?(?:seconds?|secs?|s)\b")


def deadline_in_words(match_text: str, now_ms: int) -> int | None:
    """The reset a refusal announces in its words (`normalise`d), as a deadline; None if
    it announces none or one beyond `reset_times.MAX_AHEAD_MS`."""
    found = _WAIT_IN_WORDS.search(match_text)
    if found is None:
        return None
    wait_ms = math.ceil(float(found.group(1)) * SECOND_MS)
    return now_ms + wait_ms if 0 < wait_ms <= MAX_AHEAD_MS else None


def _reason(rule: Rule, status: int, message: ErrorText) -> str:
    # Kimi's words in a reason (a fallback row quotes `error.type` and the message; a
    # connection error quotes mitmproxy) are outside text: `text.clean_line` makes each
    # one printable line with keys masked and a capped length, so what reaches the file,
    # the log and list-keys can't forge lines, drive the terminal or break a save.
    reason = rule.reason.format(status=status)
    # Rows matched by wording already say what happened; fallbacks quote Kimi so a
    # person can tell what the table missed.
    if rule.phrases or rule.verdict is Verdict.SUCCESS:
        return reason
    error_type = clean_line(message.error_type or "", REASON_TYPE_CHARS)
    parts = [p for p in (error_type, clean_line(message.text, REASON_DETAIL_CHARS)) if p]
    return clean_line(f"{reason}: {': '.join(parts)}", REASON_MOST) if parts else reason


def _quote(text: str, most: int) -> str:
    """Outside words as a reason may quote them: clean, single-spaced, at most `most` long."""
    return cap(_collapse(clean_line(text, BODY_SCAN_LIMIT)), most)


def _collapse(text: str) -> str:
    return " ".join(text.split())
