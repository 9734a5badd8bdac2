"""Answers the proxy gives itself, in the Anthropic error shape clients understand."""

from __future__ import annotations

import json

from mitmproxy import http

from rotator.access import Denial
from rotator.proxy import bodies
from rotator.clock import seconds_until
from rotator.models import AccountsFile
from rotator.status import summary, view_pool
from rotator.strategies import Shortage, Unavailable


def anthropic_error(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> http.Response:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    all_headers = {"content-type": "application/json", **(headers or {})}
    return http.Response.make(status, json.dumps(body).encode(), all_headers)


def refused(denial: Denial) -> http.Response:
    return anthropic_error(denial.status, denial.error_type, denial.message)


def no_key(why: Unavailable, state: AccountsFile, now: int, location: str, store_problem: str | None) -> http.Response:
    """Why no key can serve this request, and when one will."""
    if store_problem is not None and not state.accounts:
        return anthropic_error(
            503, "api_error",
            f"kimi-rotator cannot read its accounts file ({store_problem}); fix or restore it, "
            "the proxy picks it up within a second",
        )
    if why.shortage is Shortage.NO_KEYS:
        return anthropic_error(
            503, "api_error", f"no Kimi API keys configured in {location}; run: kimi-rotator add-key sk-kimi-…"
        )
    keys = summary(view_pool(state, now), now)
    if why.shortage is Shortage.ALL_DISABLED:
        return anthropic_error(
            503, "api_error",
            "every Kimi API key is disabled; see `kimi-rotator list-keys`, then "
            "`kimi-rotator enable-key INDEX` or add a key. " + keys,
        )
    wait_s = 1
    if why.available_at_ms is not None:
        wait_s = max(1, seconds_until(why.available_at_ms, now))
    return anthropic_error(
        429, "rate_limit_error",
        f"kimi-rotator: {why.shortage.value}; the next key is free in {wait_s} s. " + keys,
        {"retry-after": str(wait_s)},
    )


def resend_failed(detail: str) -> http.Response:
    return anthropic_error(502, "api_error", f"kimi-rotator: resending on another key failed: {detail}")


def take_resent(flow: http.HTTPFlow, copy: http.HTTPFlow, detail: str) -> None:
    """The client's flow takes a resend's answer (or a 502 saying why there is none) and
    shows the (masked) key that gave it."""
    for name in ("x-api-key", "authorization"):
        if name in copy.request.headers:
            flow.request.headers[name] = copy.request.headers[name]
    if copy.response is not None:
        flow.response = copy.response
    else:
        flow.response = resend_failed(copy.error.msg if copy.error else detail)


def give(flow: http.HTTPFlow, answer: http.Response, comment: str, *, streamed: bool = False) -> None:
    """Answer `flow` ourselves; a request whose body mitmproxy streams cannot be
    answered (mitmproxy refuses a response set on it), so it is closed instead."""
    if streamed:
        close(flow, f"{comment}; {bodies.CLOSED}")
        bodies.tell_once_about_closing()
    else:
        flow.response = answer
        flow.comment = comment


def close(flow: http.HTTPFlow, comment: str) -> None:
    """End `flow` without an answer and without sending it upstream."""
    if flow.killable:
        flow.kill()
    flow.comment = comment
