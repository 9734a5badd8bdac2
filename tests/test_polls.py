"""Quota polling in process: the proxy asks /usages for every enabled key at start, then
for keys used since their last reading, one poll per key at a time, never counted as a
request; a spent key is avoided without a single request, and a poll answered 401
disables its key. A fake upstream stands in for Kimi and a fake sleep for the time."""

from __future__ import annotations

import re

import asyncio
import json
import logging
from typing import Any

import pytest
from mitmproxy import exceptions, http

from rotator.core.keys import mask_key, mask_key_ascii
from rotator.proxy.polls import poll_target
from testbed.hooks import kimi_flow
from tests.support.accounts import KEYS
from tests.support.in_process import USAGES, addon_in_taddons, kimi_error, success

HOUR = 3_600_000


class SteppedSleep:
    """Stands in for asyncio.sleep in the poll loop: returns at once for the first
    `allowed` calls, then holds until the test allows more."""

    def __init__(self, allowed: int = 0) -> None:
        self.calls: list[float] = []
        self.allowed = allowed
        self._more = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        while len(self.calls) > self.allowed:
            self._more.clear()
            await self._more.wait()

    def allow(self, more: int = 1) -> None:
        self.allowed += more
        self._more.set()


def usages_answer(limit: int, used: int, reset_ms: int, parallel: int = 30) -> http.Response:
    body = {
        "usage": {"limit": "2048", "used": "1", "remaining": "2047", "resetTime": str(reset_ms + 40 * HOUR)},
        "limits": [{"window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                    "detail": {"limit": str(limit), "used": str(used), "remaining": str(max(0, limit - used)),
                               "resetTime": str(reset_ms)}}],
        "parallel": {"limit": str(parallel)},
    }
    return http.Response.make(200, json.dumps(body), {"content-type": "application/json"})


async def settle() -> None:
    for _ in range(20):  # polls run in tasks of their own
        await asyncio.sleep(0)


@pytest.fixture
def polling(proxy):
    """start(answer, **options) -> (addon, upstream, sleep): test_retry's `proxy`, running,
    its polls sleeping on a `SteppedSleep`."""

    def start(answer, keys=KEYS, fields=None, sleep: SteppedSleep | None = None, **options: Any):
        addon, upstream = proxy(answer, keys, fields, **options)
        stepped = sleep or SteppedSleep()
        addon.polls.sleep = stepped
        addon.running()  # each test ends with addon.done()
        return addon, upstream, stepped

    return start


async def test_every_enabled_key_is_polled_once_at_start_spread_out_and_never_counted(polling, clock):
    reset = clock.now + 2 * HOUR

    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        assert flow.request.path == USAGES
        assert flow.request.headers["authorization"] == f"Bearer {key}"
        return usages_answer(200, 3, reset)

    addon, upstream, sleep = polling(answer, fields={"k2": {"disabled_reason": "revoked"}}, sleep=SteppedSleep(2))
    await settle()
    assert upstream.keys_sent(USAGES) == KEYS[:2]  # the disabled key is not asked
    assert sleep.calls == [0.5, 0.5, 300.0]  # a pause before each, then the interval
    for i in range(2):
        account = addon.pool.accounts[i]
        assert account.quota is not None and account.quota.windows[0].used == 3
        assert account.total_requests == 0 and account.health_score == 100  # not a request
    assert len(addon.ledger) == 0 and len(addon.polls) == 0
    await addon.done()


async def test_a_spent_key_is_avoided_without_ever_being_sent_a_request(polling, clock, caplog):
    reset = clock.now + 2 * HOUR

    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        if flow.request.path == USAGES:
            return usages_answer(200, 200 if key == KEYS[0] else 10, reset)
        return success()

    caplog.set_level(logging.INFO)
    addon, upstream, _ = polling(answer, sleep=SteppedSleep(5))
    await settle()
    assert len(upstream.keys_sent(USAGES)) == 3
    for _ in range(6):
        await upstream(kimi_flow())
    assert KEYS[0] not in upstream.keys_sent()
    assert upstream.keys_sent()  # the others served
    # A duration and the clock time, not seconds (issue 27).
    assert re.search(rf"{re.escape(mask_key(KEYS[0]))}\) cooling for 2h 00m, until \d\d:\d\d: "
                     r"5-hour quota spent \(200 of 200 used\)", caplog.text), caplog.text
    await addon.done()


async def test_after_the_interval_only_keys_used_since_their_reading_are_polled(polling, clock):
    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        if flow.request.path == USAGES:
            return usages_answer(200, 3, clock.now + 2 * HOUR)
        return success()

    addon, upstream, sleep = polling(answer, kimi_usage_interval="60")
    sleep.allow(3)  # the pauses before the three start polls
    await settle()
    assert len(upstream.keys_sent(USAGES)) == 3
    clock.advance(1000)
    flow = kimi_flow()
    await upstream(flow)
    used = upstream.keys_sent()[0]
    clock.advance(60_000)
    sleep.allow()  # the interval passes
    await settle()
    assert sleep.calls[3] == pytest.approx(60.0)
    assert upstream.keys_sent(USAGES)[3:] == [used]
    await addon.done()


async def test_one_poll_per_key_at_a_time_and_polls_end_with_the_proxy(polling, clock):
    def answer(flow: http.HTTPFlow, key: str) -> http.Response | None:
        return None  # every poll hangs

    addon, upstream, _ = polling(answer, kimi_usage_interval="0")
    assert len(addon.polls) == 0  # interval 0: nothing polled at start
    assert addon.polls.poll_now() == 3
    assert addon.polls.poll_now() == 0
    await settle()
    assert len(upstream.keys_sent(USAGES)) == 3
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await addon.done()
    assert len(addon.polls) == 0
    assert all(t.done() for t in tasks)


async def test_a_poll_answered_401_disables_the_key_as_a_request_would(polling, clock, caplog):
    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        if key == KEYS[1]:
            return kimi_error(401, f"Invalid Authentication: {key}")
        return usages_answer(200, 3, clock.now + HOUR)

    caplog.set_level(logging.INFO)
    addon, upstream, _ = polling(answer, sleep=SteppedSleep(5))
    await settle()
    account = addon.pool.accounts[1]
    assert account.disabled_reason == "key rejected as invalid"
    assert account.total_requests == 0
    assert f"{mask_key(KEYS[1])}) disabled" in caplog.text
    assert KEYS[1] not in caplog.text
    assert addon.pool.accounts[0].disabled_reason is None
    await addon.done()


async def test_the_poll_flow_keeps_only_the_masked_key(polling, clock):
    polls: list[http.HTTPFlow] = []

    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        polls.append(flow)
        return usages_answer(200, 3, clock.now + HOUR)

    addon, _, _ = polling(answer, keys=KEYS[:1], sleep=SteppedSleep(1))
    await settle()
    assert len(polls) == 1
    assert KEYS[0] not in str(polls[0].request.headers)
    assert polls[0].request.headers["authorization"] == f"Bearer {mask_key_ascii(KEYS[0])}"
    assert polls[0].metadata["kimi_rotator"] == {"quota_poll": mask_key(KEYS[0])}
    await addon.done()


async def test_polls_go_where_clients_requests_went_with_their_identity(polling, clock):
    seen: list[tuple[str, str, int, str | None]] = []

    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        r = flow.request
        if r.path == USAGES:
            seen.append((r.scheme, r.host, r.port, r.headers.get("user-agent")))
            return usages_answer(200, 3, clock.now + HOUR)
        return success()

    addon, upstream, _ = polling(answer, keys=KEYS[:1], kimi_usage_interval="0",
                                 kimi_hosts=["api.kimi.com", "kimi.internal"])
    flow = kimi_flow(host="kimi.internal")
    flow.request.port = 8443
    flow.request.headers["user-agent"] = "KimiCLI/1.0"
    await upstream(flow)
    addon.polls.poll_now()
    await settle()
    assert seen == [("https", "kimi.internal", 8443, "KimiCLI/1.0")]
    await addon.done()


@pytest.mark.parametrize(
    "modes, hosts, target",
    [
        (["regular"], {"api.kimi.com"}, ("https", "api.kimi.com", 443)),
        (["reverse:https://api.kimi.com@127.0.0.1:8080"], {"api.kimi.com"}, ("https", "api.kimi.com", 443)),
        (["reverse:http://127.0.0.1:41000"], {"127.0.0.1"}, ("http", "127.0.0.1", 41000)),
        (["reverse:http://example.org:41000"], {"api.kimi.com"}, ("https", "api.kimi.com", 443)),
        (["regular"], {"kimi.b.test", "kimi.a.test"}, ("https", "kimi.a.test", 443)),
    ],
)
def test_where_polls_go_before_any_client_request(modes, hosts, target):
    assert poll_target(modes, hosts) == target


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("kimi_usage_interval", "5", "kimi_usage_interval must be 0 (off) or at least 10 seconds"),
        ("kimi_usage_interval", "soon", "kimi_usage_interval: 'soon' is not a number of seconds"),
        ("kimi_usage_interval", "-1", "kimi_usage_interval must be between 0 and 604800 seconds"),
        ("kimi_quota_reserve", "150", "kimi_quota_reserve must be between 0 and 100 percent"),
        ("kimi_quota_reserve", "nan", "kimi_quota_reserve must be between 0 and 100 percent"),
    ],
)
def test_odd_polling_options_are_refused_naming_the_option(tmp_path, option, value, message):
    with addon_in_taddons() as (addon, tctx):
        tctx.configure(addon, kimi_accounts=str(tmp_path / "a.json"))
        with pytest.raises(exceptions.OptionsError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            tctx.configure(addon, **{option: value})


async def test_the_reserve_option_reaches_the_pool(polling, clock):
    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        return usages_answer(200, 180, clock.now + HOUR)  # 10 % left

    addon, _, _ = polling(answer, keys=KEYS[:1], kimi_quota_reserve="10", sleep=SteppedSleep(5))
    await settle()
    assert addon.pool.accounts[0].rate_limit_reset_time == clock.now + HOUR
    await addon.done()


async def test_with_every_key_spent_the_429_says_which_window_and_when(polling, clock):
    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        if flow.request.path == USAGES:
            return usages_answer(200, 200, clock.now + 2 * HOUR)
        return success()

    addon, upstream, _ = polling(answer, sleep=SteppedSleep(5), kimi_max_wait="0")
    await settle()
    flow = kimi_flow()
    await upstream(flow)
    assert upstream.keys_sent() == []  # no key was sent a request
    assert flow.response is not None and flow.response.status_code == 429
    assert flow.response.headers["retry-after"] == "7200"
    message = json.loads(flow.response.content)["error"]["message"]
    assert f"[0] {mask_key(KEYS[0])} free in 7200 s, 5-hour quota spent (200 of 200 used), per Kimi's /usages" in message
    await addon.done()
