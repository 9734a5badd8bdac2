"""Answers the proxy gives itself (no key, every key cooling, a refused client, a failed
resend), in the error shape of the endpoint the client called.

They are made in the Anthropic shape (`{"type": "error", "error": {"type", "message"}}`),
which `/coding/v1/messages` and everything else but the OpenAI-shaped endpoint speak;
on its way to a client of `/chat/completions` (Kimi CLI, any OpenAI SDK) an answer takes
that endpoint's shape instead, `{"error": {"message", "type", "code"}}`, with the same
status, message and headers (`retry-after` included): `for_request`, which `give` and
`take_resent` apply, and which whoever else sets an answer of ours on a flow calls.
"""

from __future__ import annotations

import json

from mitmproxy import http

from rotator.core.access import Denial
from rotator.core.clock import seconds_until
from rotator.core.key_view import summary, view_pool
from rotator.core.models import AccountsFile
from rotator.core.strategies import Shortage, Unavailable
from rotator.proxy import bodies
from rotator.store import StateStore, cli_command


OPENAI_PATH_SUFFIX = "/chat/completions"
# The Anthropic error.type of our own answers -> the OpenAI shape's type and code (the
# types are Kimi's own on that endpoint where it has one, the codes OpenAI's).
_OPENAI_ERRORS: dict[str, tuple[str, str]] = {
    "rate_limit_error": ("rate_limit_reached_error", "rate_limit_exceeded"),
    "authentication_error": ("invalid_authentication_error", "invalid_api_key"),
    "permission_error": ("permission_denied_error", "permission_denied"),
}
_OPENAI_BY_STATUS: dict[int, tuple[str, str]] = {
    502: ("server_error", "bad_gateway"),
    503: ("service_unavailable_error", "service_unavailable"),
}
_OPENAI_FALLBACK = ("server_error", "server_error")


def speaks_openai(request: http.Request) -> bool:
    """Whether the client called the OpenAI-shaped endpoint (`…/chat/completions`)."""
    return request.path.split("?", 1)[0].rstrip("/").endswith(OPENAI_PATH_SUFFIX)


def for_request(request: http.Request, answer: http.Response) -> http.Response:
    """Our own `answer`, in the error shape of the endpoint `request` called."""
    return openai_shaped(answer) if speaks_openai(request) else answer


def openai_shaped(answer: http.Response) -> http.Response:
    """An Anthropic-shaped answer of ours in the OpenAI shape; anything else as it is."""
    try:
        document = json.loads(answer.content or b"")
        error = document["error"]
        message, error_type = error["message"], error["type"]
    except (ValueError, KeyError, TypeError):
        return answer
    if document.get("type") != "error":  # not the Anthropic shape (already OpenAI's)
        return answer
    kind, code = _OPENAI_ERRORS.get(error_type) or _OPENAI_BY_STATUS.get(answer.status_code, _OPENAI_FALLBACK)
    body = {"error": {"message": message, "type": kind, "code": code}}
    headers = [(name, value) for name, value in answer.headers.fields if name.lower() != b"content-length"]
    return http.Response.make(answer.status_code, json.dumps(body).encode(), headers)


def anthropic_error(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> http.Response:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    all_headers = {"content-type": "application/json", **(headers or {})}
    return http.Response.make(status, json.dumps(body).encode(), all_headers)


def refused(denial: Denial) -> http.Response:
    return anthropic_error(denial.status, denial.error_type, denial.message)


def no_key(why: Unavailable, state: AccountsFile, now: int, store: StateStore, store_problem: str | None) -> http.Response:
    """Why no key can serve this request, and when one will; a command it advises names
    the store (`cli_command`), so it changes the pool this proxy serves."""
    location = store.location
    if store_problem is not None and not state.accounts and location.startswith(("redis://", "rediss://")):
        return anthropic_error(
            503, "api_error",
            f"kimi-rotator: team store unreachable at {store_problem}; the proxy serves as soon "
            "as it can read the pool",
        )
    if store_problem is not None and not state.accounts:
        return anthropic_error(
            503, "api_error",
            f"kimi-rotator cannot read its accounts file ({store_problem}); fix or restore it, "
            "the proxy picks it up within a second",
        )
    if why.shortage is Shortage.NO_KEYS:
        return anthropic_error(
            503, "api_error", f"no Kimi API keys configured in {location}; run: {cli_command(store, 'add-key sk-kimi-…')}"
        )
    keys = summary(view_pool(state, now), now)
    if why.shortage is Shortage.ALL_DISABLED:
        return anthropic_error(
            503, "api_error",
            f"every Kimi API key is disabled; see `{cli_command(store, 'list-keys')}`, then "
            f"`{cli_command(store, 'enable-key INDEX')}` or add a key. " + keys,
        )
    wait_s = 1
    if why.available_at_ms is not None:
        wait_s = max(1, seconds_until(why.available_at_ms, now))
    if why.shortage is Shortage.ALL_SKIPPED:
        when = "a busy key frees when a request on it ends"
        if why.available_at_ms is not None:
            when += f", a cooling one in {wait_s} s"
        wait_s = 1
    else:
        when = f"the next key is free in {wait_s} s"
    return anthropic_error(
        429, "rate_limit_error", f"kimi-rotator: {why.shortage.value}; {when}. " + keys,
        {"retry-after": str(wait_s)},
    )


def resend_failed(detail: str) -> http.Response:
    return anthropic_error(502, "api_error", f"kimi-rotator: resending on another key failed: {detail}")


def take_resent(flow: http.HTTPFlow, copy: http.HTTPFlow, detail: str, *, answer: bool = True) -> None:
    """The client's flow takes a resend's answer (or a 502 saying why there is none) and
    shows the (masked) key that gave it; with `answer` False (the answer went to the
    client as it streamed, rotator.proxy.splice), only the key."""
    for name in ("x-api-key", "authorization"):
        if name in copy.request.headers:
            flow.request.headers[name] = copy.request.headers[name]
    if not answer:
        return
    if copy.response is not None:
        flow.response = copy.response
    else:
        flow.response = for_request(flow.request, resend_failed(copy.error.msg if copy.error else detail))


def give(flow: http.HTTPFlow, answer: http.Response, comment: str, *, streamed: bool = False) -> None:
    """Answer `flow` ourselves; a request whose body mitmproxy streams cannot be
    answered (mitmproxy refuses a response set on it), so it is closed instead."""
    if streamed:
        close(flow, f"{comment}; {bodies.CLOSED}")
        bodies.tell_once_about_closing()
    else:
        flow.response = for_request(flow.request, answer)
        flow.comment = comment


def close(flow: http.HTTPFlow, comment: str) -> None:
    """End `flow` without an answer and without sending it upstream."""
    if flow.killable:
        flow.kill()
    flow.comment = comment
