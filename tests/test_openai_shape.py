"""Kimi's OpenAI-shaped endpoint (/coding/v1/chat/completions): the proxy's own answers
there in the OpenAI error shape, with the status and retry-after the Anthropic-shaped
ones have; the policy reading refusals in that shape; and, through a real mitmdump, a
rate-limited key retried on another and an all-cooling pool's honest 429."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from rotator.core import policy
from rotator.core.keys import mask_key
from rotator.core.models import Account
from rotator.core.policy import Verdict
from rotator.proxy import answers
from rotator.proxy.addon import KimiRotator
from testbed.fake_kimi import CHAT_COMPLETIONS_PATH, KIMI_ERRORS, MESSAGES_PATH, FakeKimi, kimi_error
from testbed.hooks import FakeClock, call_hook
from testbed.processes import Proxy
from tests.support.accounts import NOW, fake_key, fake_keys, write_pool
from tests.support.in_process import addon_in_taddons

KEYS = fake_keys(2)
CHAT = {"model": "kimi-for-coding", "messages": [{"role": "user", "content": "hi"}]}
S = 1000
OPENAI_KEYS = {"message", "type", "code"}


def flow_to(path: str, peer: tuple[str, int] = ("127.0.0.1", 40000), **headers: str) -> http.HTTPFlow:
    request = tutils.treq(host="api.kimi.com", port=443, path=path.encode(), headers=http.Headers(**headers))
    request.scheme = "https"
    request.method = "POST"
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = peer
    return flow


def openai_error(response: http.Response) -> dict[str, Any]:
    body = json.loads(response.content or b"")
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_KEYS, body
    return body["error"]


def anthropic_error(response: http.Response) -> dict[str, Any]:
    body = json.loads(response.content or b"")
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    return body["error"]


async def answered_itself(tmp_path: Path, accounts: list[Account], path: str, **options: Any) -> http.Response:
    """The answer the proxy gives itself to one request on `path`."""
    clock = FakeClock(NOW)
    with addon_in_taddons(write_pool(tmp_path / "accounts.json", accounts), clock=clock,
                          kimi_max_wait="0", **options) as (addon, _):
        flow = flow_to(path, authorization="Bearer sk-kimi-placeholder")
        if options.get("kimi_allow_remote"):
            flow.client_conn.peername = ("192.0.2.7", 40000)
        await call_hook(addon, "request", flow)
        assert flow.response is not None
        return flow.response


COOLING = [Account(key=KEYS[0], rate_limit_reset_time=NOW + 42 * S), Account(key=KEYS[1], rate_limit_reset_time=NOW + 9 * S)]
DISABLED = [Account(key=k, disabled_reason="key rejected as invalid") for k in KEYS]
CASES = {
    "every-key-cooling": (COOLING, {}, 429, "rate_limit_reached_error", "rate_limit_exceeded"),
    "no-keys": ([], {}, 503, "service_unavailable_error", "service_unavailable"),
    "every-key-disabled": (DISABLED, {}, 503, "service_unavailable_error", "service_unavailable"),
}


# -- the proxy's own answers ------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
async def test_own_answers_on_chat_completions_are_openai_shaped(tmp_path: Path, case: str) -> None:
    accounts, options, status, kind, code = CASES[case]
    chat = await answered_itself(tmp_path, accounts, CHAT_COMPLETIONS_PATH, **options)
    messages = await answered_itself(tmp_path, accounts, MESSAGES_PATH, **options)
    error = openai_error(chat)
    assert (chat.status_code, error["type"], error["code"]) == (status, kind, code)
    assert error["message"] == anthropic_error(messages)["message"]  # the same words
    assert chat.status_code == messages.status_code
    assert chat.headers.get("retry-after") == messages.headers.get("retry-after")
    assert chat.headers["content-type"] == "application/json"
    assert int(chat.headers["content-length"]) == len(chat.content or b"")
    for key in KEYS:
        assert key.encode() not in (chat.content or b"")


async def test_every_key_cooling_says_when_the_next_is_free(tmp_path: Path) -> None:
    chat = await answered_itself(tmp_path, COOLING, CHAT_COMPLETIONS_PATH)
    assert chat.headers["retry-after"] == "9"
    assert mask_key(KEYS[1]) in openai_error(chat)["message"] and "free in 9 s" in openai_error(chat)["message"]


@pytest.mark.parametrize(
    "refusal, status, kind, code",
    [("no-token", 401, "invalid_authentication_error", "invalid_api_key"),
     ("remote", 403, "permission_denied_error", "permission_denied")],
)
async def test_a_refused_client_gets_the_openai_shape(
    tmp_path: Path, refusal: str, status: int, kind: str, code: str
) -> None:
    token = tmp_path / "token"
    token.write_text("a-long-client-token-for-tests\n")
    peer = ("192.0.2.7", 40000) if refusal == "remote" else ("127.0.0.1", 40000)
    with addon_in_taddons(write_pool(tmp_path / "a.json", [Account(key=KEYS[0])]), clock=FakeClock(NOW),
                          kimi_client_token_file=str(token)) as (addon, _):
        chat = flow_to(CHAT_COMPLETIONS_PATH + "?x=1", peer, authorization="Bearer wrong")
        messages = flow_to(MESSAGES_PATH, peer, authorization="Bearer wrong")
        for flow in (chat, messages):
            await call_hook(addon, "request", flow)
    assert chat.response is not None and messages.response is not None
    assert chat.response.status_code == messages.response.status_code == status
    error = openai_error(chat.response)
    assert (error["type"], error["code"]) == (kind, code)
    assert error["message"] == anthropic_error(messages.response)["message"]


def test_shaping_leaves_other_answers_alone() -> None:
    kimi_says = http.Response.make(429, json.dumps(kimi_error("too_many_requests", envelope="openai")[1]))
    assert answers.openai_shaped(kimi_says) is kimi_says  # Kimi's own, already OpenAI's
    shaped = answers.openai_shaped(answers.resend_failed("boom"))
    assert answers.openai_shaped(shaped) is shaped  # once only
    assert (shaped.status_code, openai_error(shaped)["code"]) == (502, "bad_gateway")
    for raw in (b"", b"not json", b"[]", b'{"error": "x"}'):
        odd = http.Response.make(500, raw)
        assert answers.openai_shaped(odd) is odd


@pytest.mark.parametrize(
    "path, openai",
    [("/coding/v1/chat/completions", True), ("/coding/v1/chat/completions/", True),
     ("/v1/chat/completions?stream=1", True), ("/coding/v1/messages", False), ("/coding/v1/usages", False),
     ("/coding/v1/chat/completions-not", False)],
)
def test_which_requests_speak_openai(path: str, openai: bool) -> None:
    assert answers.speaks_openai(flow_to(path).request) is openai


class RefusingUpstream:
    """Kimi for the addon's own resends: every key refused with `name`, OpenAI-shaped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.addon: KimiRotator | None = None
        self.keys: list[str] = []

    async def __call__(self, flow: http.HTTPFlow) -> None:
        assert self.addon is not None
        await call_hook(self.addon, "request", flow)
        self.keys.append(flow.request.headers["authorization"].removeprefix("Bearer "))
        flow.response = refusal(self.name)
        await call_hook(self.addon, "responseheaders", flow)
        await call_hook(self.addon, "response", flow)


def refusal(name: str, headers: dict[str, str] | None = None) -> http.Response:
    status, body = kimi_error(name, envelope="openai")
    return http.Response.make(status, json.dumps(body), {"content-type": "application/json", **(headers or {})})


async def test_retries_that_find_every_key_refused_end_in_an_openai_429(tmp_path: Path) -> None:
    upstream = RefusingUpstream("too_many_requests")
    with addon_in_taddons(write_pool(tmp_path / "a.json", [Account(key=k) for k in KEYS]), clock=FakeClock(NOW),
                          send=upstream, kimi_max_wait="0") as (addon, _):
        flow = flow_to(CHAT_COMPLETIONS_PATH, authorization="Bearer sk-kimi-placeholder")
        await call_hook(addon, "request", flow)
        assert flow.request.headers["authorization"] == f"Bearer {KEYS[0]}"
        flow.response = refusal("too_many_requests")
        await call_hook(addon, "responseheaders", flow)
        await asyncio.wait_for(call_hook(addon, "response", flow), 5)
    assert upstream.keys == [KEYS[1]]  # retried on the other key, which was refused too
    assert flow.response.status_code == 429
    error = openai_error(flow.response)
    assert (error["type"], error["code"]) == ("rate_limit_reached_error", "rate_limit_exceeded")
    assert int(flow.response.headers["retry-after"]) >= 1 and "kimi-rotator" in error["message"]


# -- the policy reads refusals in the OpenAI shape ----------------------------------------------


@pytest.mark.parametrize(
    "name, verdict, window",
    [
        ("too_many_requests", Verdict.RATE_LIMITED, None),
        ("overloaded", Verdict.RATE_LIMITED, None),
        ("engine_overloaded", Verdict.RATE_LIMITED, None),
        ("max_rpm", Verdict.RATE_LIMITED, None),
        ("tpm", Verdict.RATE_LIMITED, None),
        ("max_concurrency", Verdict.CONCURRENCY_LIMIT, None),
        ("quota_exceeded", Verdict.MEMBERSHIP_INACTIVE, None),
        ("period_limit", Verdict.WINDOW_EXHAUSTED, policy.Window.FIVE_HOUR),
        ("five_hour", Verdict.WINDOW_EXHAUSTED, policy.Window.FIVE_HOUR),
        ("weekly", Verdict.WINDOW_EXHAUSTED, policy.Window.WEEKLY),
        ("monthly", Verdict.WINDOW_EXHAUSTED, policy.Window.BILLING_CYCLE),
        ("membership", Verdict.MEMBERSHIP_INACTIVE, None),
        ("client_identity", Verdict.CLIENT_REJECTED, None),
        ("banned", Verdict.ACCOUNT_BANNED, None),
        ("invalid_auth", Verdict.KEY_INVALID, None),
        ("key_expired", Verdict.KEY_INVALID, None),
        ("server_error", Verdict.UPSTREAM_FAULT, None),
    ],
)
@pytest.mark.parametrize("envelope", ["openai", "anthropic"])
def test_refusals_read_alike_in_either_envelope(name: str, verdict: Verdict, window: Any, envelope: str) -> None:
    status, body = kimi_error(name, envelope=envelope)
    outcome = policy.classify(status, {}, json.dumps(body).encode(), NOW)
    assert (outcome.verdict, outcome.window) == (verdict, window)
    # Wording decides, whatever the status it came with.
    assert policy.classify(403 if status != 403 else 429, {}, json.dumps(body), NOW).verdict is verdict or (
        verdict is Verdict.UPSTREAM_FAULT
    )


def test_every_openai_wording_in_the_fake_is_understood() -> None:
    for name, (status, _, _) in KIMI_ERRORS.items():
        outcome = policy.classify(status, {}, json.dumps(kimi_error(name, envelope="openai")[1]), NOW)
        assert "unrecognised" not in outcome.reason and "HTTP 429: rate limited:" not in outcome.reason, name


def test_an_empty_balance_rests_the_key_a_day_instead_of_a_minute() -> None:
    outcome = policy.classify(429, {}, json.dumps(kimi_error("quota_exceeded", envelope="openai")[1]), NOW)
    assert outcome.cooldown_until_ms == NOW + policy.MEMBERSHIP_COOLDOWN_MS and outcome.retry_elsewhere
    assert outcome.reason == "account out of balance or token quota"


@pytest.mark.parametrize(
    "name, headers, until",
    [
        ("max_rpm", {}, NOW + 7 * S),  # "please try again after 7 seconds": the server knows
        ("max_rpm", {"retry-after": "30"}, NOW + 30 * S),  # a header wins over the words
        ("max_concurrency", {}, NOW + policy.CONCURRENCY_COOLDOWN_MS),  # the later of 1 s and 10 s
        ("too_many_requests", {}, NOW + policy.RATE_LIMIT_COOLDOWN_MS),  # no time said: the default
    ],
)
def test_a_wait_said_in_words_is_read_like_retry_after(name: str, headers: dict[str, str], until: int) -> None:
    outcome = policy.classify(429, headers, json.dumps(kimi_error(name, envelope="openai")[1]), NOW)
    assert outcome.cooldown_until_ms == until


@pytest.mark.parametrize(
    "text, wait_ms",
    [("please try again after 3 seconds", 3 * S), ("try again in 1.5 s", 1500), ("retry after 20 secs", 20 * S),
     ("try again after 0 seconds", None), ("try again after 99999999 seconds", None), ("try again later", None),
     ("try again after 3 sessions", None)],
)
def test_deadline_in_words(text: str, wait_ms: int | None) -> None:
    found = policy.deadline_in_words(policy.normalise(text), NOW)
    assert found == (None if wait_ms is None else NOW + wait_ms)


def test_the_error_type_alone_still_decides_nothing() -> None:
    body = json.dumps({"error": {"message": "bad request", "type": "rate_limit_reached_error", "code": None}})
    assert policy.classify(400, {}, body, NOW).verdict is Verdict.REQUEST_ERROR


# -- end to end: a real mitmdump in front of the fake ------------------------------------------------


def chat(c: httpx.Client, proxy: Proxy, stream: bool = False) -> httpx.Response:
    headers = {"Authorization": "Bearer sk-kimi-placeholder", "User-Agent": "KimiCLI/1.0", "X-Msh-Platform": "kimi_cli"}
    return c.post(proxy.url + CHAT_COMPLETIONS_PATH, json={**CHAT, "stream": stream}, headers=headers)


def test_e2e_a_rate_limited_key_is_retried_and_an_all_cooling_pool_answers_openai_429(
    fake_kimi: FakeKimi, write_accounts: Any, start_proxy: Any
) -> None:
    keys = [fake_key(f"e2eoa{i}") for i in range(2)]
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "too_many_requests", times=1, envelope="openai", path=CHAT_COMPLETIONS_PATH,
                             headers={"retry-after": "3"})
    proxy = start_proxy(fake_kimi, options={"kimi_max_wait": "0"})
    with httpx.Client(trust_env=False, timeout=10) as c:
        ok = chat(c, proxy)
        assert ok.status_code == 200, ok.text
        assert ok.json()["object"] == "chat.completion"
        assert ok.json()["choices"][0]["message"]["content"].startswith("hello from fake kimi")
        seen = fake_kimi.chat_requests()
        assert [(s.key, s.status) for s in seen] == [(keys[0], 429), (keys[1], 200)]
        assert seen[1].headers["authorization"] == f"Bearer {keys[1]}" and "x-api-key" not in seen[1].headers

        # Now key 1 is refused too (key 0 still cools): the retry finds no key.
        fake_kimi.set_kimi_error(keys[1], "engine_overloaded", envelope="openai", path=CHAT_COMPLETIONS_PATH,
                                 headers={"retry-after": "20"})
        refused = chat(c, proxy)  # key 0 cooling: key 1, refused; then nobody
        assert refused.status_code == 429, refused.text
        assert [s.key for s in fake_kimi.chat_requests()][2:] == [keys[1]]
        free_at = seen[0].time + 3
        assert abs(int(refused.headers["retry-after"]) - (free_at - time.time())) <= 1, refused.headers
        error = refused.json()["error"]
        assert set(error) == OPENAI_KEYS and error["type"] == "rate_limit_reached_error"
        assert mask_key(keys[0]) in error["message"] and keys[0] not in refused.text

        # Every key cooling at once: answered without going upstream, same shape.
        again = chat(c, proxy)
        assert again.status_code == 429 and set(again.json()["error"]) == OPENAI_KEYS
        assert int(again.headers["retry-after"]) >= 1
        assert len(fake_kimi.chat_requests()) == 3


def test_e2e_a_streamed_chat_completion_passes_as_bare_data_lines(
    fake_kimi: FakeKimi, write_accounts: Any, start_proxy: Any
) -> None:
    keys = [fake_key("e2eos0")]
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi)
    with httpx.Client(trust_env=False, timeout=10) as c:
        r = chat(c, proxy, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.text.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines[:-1])
    assert text.startswith("hello from fake kimi #")
    assert [s.key for s in fake_kimi.chat_requests()] == keys
