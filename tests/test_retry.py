"""Waiting, retries, deadlines and quota probes, in process: a fake clock and a fake
upstream stand in for time and Kimi, so hours of cooldown take microseconds."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.flow import Error

from rotator.core import policy
from rotator.core.keys import mask_key, mask_key_ascii
from rotator.core.models import Account, AccountsFile
from rotator.core.strategies import Shortage, Unavailable
from rotator.pool.events import PoolListeners
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.pool.waitline import WaitLine
from testbed.hooks import FakeClock, call_hook, kimi_flow, run_virtual
from tests.support.accounts import KEYS
from tests.support.in_process import USAGES, kimi_error, success

OK = policy.classify(200, {}, b"{}", 0)


# -- waiting in line ---------------------------------------------------------------------


def _lined(state: AccountsFile, **kwargs: Any) -> tuple[KeyPool, WaitLine]:
    """A pool and its wait line, the line listening (as rotator.proxy.assembly wires them)."""
    listeners = PoolListeners()
    pool = KeyPool(state, listener=listeners, **kwargs)
    line = WaitLine(pool)
    listeners.add(line)
    return pool, line


async def test_a_freed_key_serves_waiters_in_order_and_wakes_no_one_else(clock: FakeClock) -> None:
    pool, line = _lined(AccountsFile(accounts=[Account(key=KEYS[0])]), max_in_flight=1, clock=clock)
    held = pool.acquire(clock.now)
    assert isinstance(held, Lease)
    deadline = clock.now + 30_000
    waiters = [asyncio.ensure_future(line.acquire(deadline)) for _ in range(50)]
    await asyncio.sleep(0)
    assert len(line) == 50
    choices = 0
    acquire = pool.acquire

    def counting_acquire(*args: Any) -> Any:
        nonlocal choices
        choices += 1
        return acquire(*args)

    pool.acquire = counting_acquire  # type: ignore[method-assign]
    pool.release(held, OK, clock.now)
    await asyncio.sleep(0)
    # One key freed: the first waiter has it, one more look found nothing, the rest slept.
    assert [w.done() for w in waiters[:3]] == [True, False, False]
    assert choices <= 2
    first = waiters[0].result()
    assert isinstance(first, Lease)
    pool.release(first, OK, clock.now)
    await asyncio.sleep(0)
    assert waiters[1].done() and not waiters[2].done()
    for waiter in waiters[2:]:
        waiter.cancel()
    await asyncio.gather(*waiters[2:], return_exceptions=True)


async def test_a_waiter_gives_up_at_its_deadline_and_is_told_why(clock: FakeClock) -> None:
    pool, line = _lined(AccountsFile(accounts=[Account(key=KEYS[0])]), max_in_flight=1, clock=clock)
    pool.acquire(clock.now)
    start = clock.now
    (result,) = await run_virtual(clock, line.acquire(start + 30_000))
    assert result == Unavailable(Shortage.ALL_SKIPPED)
    assert clock.now == start + 30_000
    assert len(line) == 0


async def test_a_waiter_served_just_as_it_is_given_up_hands_the_key_back(clock: FakeClock) -> None:
    pool, line = _lined(AccountsFile(accounts=[Account(key=KEYS[0])]), max_in_flight=1, clock=clock)
    held = pool.acquire(clock.now)
    waiter = asyncio.ensure_future(line.acquire(clock.now + 30_000))
    await asyncio.sleep(0)
    pool.release(held, OK, clock.now)  # hands the key to the waiter...
    waiter.cancel()  # ...whose client left before it could use it
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.in_flight == {}
    assert pool.accounts[0].total_requests == 1  # only the request that was sent


async def test_a_cooling_key_serves_the_waiter_when_its_cooldown_ends(clock: FakeClock) -> None:
    account = Account(key=KEYS[0], rate_limit_reset_time=clock.now + 12_000)
    pool, line = _lined(AccountsFile(accounts=[account]), clock=clock)
    start = clock.now
    (lease,) = await run_virtual(clock, line.acquire(start + 30_000))
    assert isinstance(lease, Lease)
    assert clock.now == start + 12_000


# -- one deadline per request ------------------------------------------------------------------


async def test_waiting_and_retries_share_one_deadline(proxy, clock: FakeClock) -> None:
    start = clock.now
    # The only key cools 20 s; after that wait it answers 429 for another 15 s, which
    # would end 35 s after the request came: beyond its 30 s, so no second wait.
    addon, upstream = proxy(
        lambda flow, key: kimi_error(429, "rate limited", {"retry-after": "15"}),
        keys=KEYS[:1], fields={"k0": {"rate_limit_reset_time": start + 20_000}},
        kimi_max_wait="30",
    )
    flow = kimi_flow()
    await run_virtual(clock, upstream(flow))
    assert len(upstream.keys_sent()) == 1
    assert clock.now - start == 20_000
    assert flow.response is not None and flow.response.status_code == 429
    assert flow.response.headers["retry-after"] == "15"
    assert "no other key" in flow.comment


async def test_the_client_flow_names_every_attempt_in_a_persons_words(proxy, clock: FakeClock) -> None:
    """Issue 27: mitmweb shows the client's one flow; its comment lists the chain, each
    attempt's key and what its answer meant, not only the last one's verdict."""
    answers = iter([kimi_error(429, "rate limited", {"retry-after": "30"}),
                    kimi_error(403, "You've reached your 5-hour usage limit"), success()])
    # (A window refusal asks /usages of that key too: that poll gets a 404.)
    addon, upstream = proxy(lambda flow, key: kimi_error(404, "no") if flow.request.path.endswith("/usages")
                            else next(answers))
    flow = kimi_flow()
    await run_virtual(clock, upstream(flow))
    assert flow.response is not None and flow.response.status_code == 200
    first, second, third = upstream.keys_sent()
    names = {key: f"[{KEYS.index(key)}] Account {KEYS.index(key)} ({mask_key(key)})" for key in KEYS}
    assert flow.comment == (
        f"kimi-rotator: {names[first]}: HTTP 429: rate limited: x: rate limited → "
        f"{names[second]}: 5-hour usage limit reached → {names[third]}: ok"
    )


async def test_retries_within_the_deadline_still_happen(proxy, clock: FakeClock) -> None:
    answers = iter([kimi_error(429, "concurrent request limit reached")] * 3 + [success()])
    addon, upstream = proxy(lambda flow, key: next(answers), kimi_max_wait="30")
    flow = kimi_flow()
    start = clock.now
    await run_virtual(clock, upstream(flow))
    # Three keys refused at once; the fourth attempt waited for the first to cool (10 s).
    assert upstream.keys_sent() == [KEYS[0], KEYS[1], KEYS[2], KEYS[0]]
    assert clock.now - start == 10_000
    assert flow.response is not None and flow.response.status_code == 200


# -- the client leaves during a resend (issue 23, item 5) ------------------------------------------


async def let_tasks_run() -> None:
    for _ in range(20):  # every ready task, up to its next wait
        await asyncio.sleep(0)


async def test_a_client_leaving_during_a_resend_stops_it_and_frees_its_key(proxy, clock: FakeClock) -> None:
    def answer(flow: http.HTTPFlow, key: str) -> http.Response | None:
        return kimi_error(429, "rate limited", {"retry-after": "60"}) if key == KEYS[0] else None  # the resend stalls

    addon, upstream = proxy(answer, keys=KEYS[:2], kimi_max_in_flight=1)
    flow = kimi_flow()
    served = asyncio.ensure_future(upstream(flow))
    await let_tasks_run()
    assert upstream.keys_sent() == [KEYS[0], KEYS[1]] and addon.pool.in_flight == {KEYS[1]: 1}
    await call_hook(addon, "client_disconnected", kimi_flow(peer=("127.0.0.1", 50002)).client_conn)
    await let_tasks_run()
    assert not served.done() and upstream.cut == []  # another client left: this resend goes on
    # The client gives up: mitmproxy closes its connection and tells the addons at once
    # (while the flow's own response hook, the retry, is still pending).
    flow.client_conn.state = ConnectionState.CLOSED
    await call_hook(addon, "client_disconnected", flow.client_conn)
    await let_tasks_run()
    assert served.done(), "the retry outlived its client"
    served.result()
    assert upstream.cut == [KEYS[1]]  # the stalled resend was stopped
    assert addon.pool.in_flight == {}
    stalled = addon.pool.account(KEYS[1])
    assert stalled is not None
    # Sent, so a request; neither a success nor a failure.
    assert (stalled.total_requests, stalled.successful_requests) == (1, 0)
    assert (stalled.health_score, stalled.consecutive_failures, stalled.rate_limit_reset_time) == (100, 0, 0)
    assert flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE  # nothing more for it
    assert "the client left" in flow.comment
    shown = flow.metadata["kimi_rotator"]["attempts"]
    assert [(a["index"], a["outcome"]) for a in shown] == [(0, "rate_limited"), (1, "client_gone")]
    assert len(addon.ledger) == 0
    # The next request gets that key at once (the other one still cools).
    upstream.answer = lambda flow, key: success()
    following = kimi_flow(peer=("127.0.0.1", 50001))
    await run_virtual(clock, upstream(following))
    assert following.response is not None and following.response.status_code == 200
    assert upstream.keys_sent()[-1] == KEYS[1]


# -- attempts live in the flow's record --------------------------------------------------------


async def test_a_replayed_saved_flow_starts_with_no_attempts_counted(proxy, clock: FakeClock) -> None:
    answers = iter([kimi_error(401, "Invalid Authentication"), success()])
    addon, upstream = proxy(lambda flow, key: next(answers))
    flow = kimi_flow()
    # What a saved flow carries from its first life: five attempts, all refused.
    old = [{"account": "Account 0", "index": 0, "key": mask_key(KEYS[0]), "outcome": "rate_limited"}] * 5
    flow.metadata["kimi_rotator"] = {"attempts": old}
    await run_virtual(clock, upstream(flow))
    assert upstream.keys_sent() == [KEYS[0], KEYS[1]]
    assert flow.response is not None and flow.response.status_code == 200
    shown = flow.metadata["kimi_rotator"]["attempts"]
    assert [(a["index"], a["outcome"]) for a in shown] == [(0, "key_invalid"), (1, "success")]


# -- keys never stay in a flow ---------------------------------------------------------------------


async def test_a_resend_that_blows_up_leaves_no_full_key_anywhere(proxy, clock: FakeClock) -> None:
    calls = 0

    def answer(flow: http.HTTPFlow, key: str) -> http.Response | Exception:
        nonlocal calls
        calls += 1
        if calls == 1:
            return kimi_error(429, "too many requests")
        return RuntimeError("connection handler crashed")  # after the key went on

    addon, upstream = proxy(answer, keys=KEYS[:2])
    flow = kimi_flow()
    await run_virtual(clock, upstream(flow))
    assert flow.response is not None and flow.response.status_code == 502
    text = repr(flow.get_state())
    for key in KEYS:
        assert key not in text
    assert flow.request.headers["x-api-key"] == mask_key_ascii(KEYS[1])
    assert len(addon.ledger) == 0
    assert addon.pool.in_flight == {}


async def test_a_flow_in_flight_at_shutdown_is_masked(proxy, clock: FakeClock) -> None:
    addon, upstream = proxy(lambda flow, key: None)
    flow = kimi_flow()
    task = asyncio.ensure_future(upstream(flow))
    await asyncio.sleep(0)
    assert flow.request.headers["x-api-key"] == KEYS[0]  # out, no answer yet
    await addon.done()
    assert flow.request.headers["x-api-key"] == mask_key_ascii(KEYS[0])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- asking /usages: once per key -----------------------------------------------------------------


async def test_many_refusals_of_one_key_send_one_probe(proxy, clock: FakeClock) -> None:
    def answer(flow: http.HTTPFlow, key: str) -> http.Response | None:
        if flow.request.path == USAGES:
            return None  # held until the test lets go
        return kimi_error(429, "You've reached your 5-hour usage limit")

    addon, upstream = proxy(answer, keys=KEYS[:1], kimi_max_attempts=1)
    flows = [kimi_flow() for _ in range(30)]
    await asyncio.gather(*(upstream(f) for f in flows))
    await asyncio.sleep(0)
    assert len(upstream.keys_sent(USAGES)) == 1
    assert upstream.keys_sent(USAGES) == [KEYS[0]]
    assert len(addon.polls) == 1
    probe_tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert probe_tasks
    # Stopping the proxy ends the probe instead of leaving it running.
    await addon.done()
    assert len(addon.polls) == 0
    assert all(t.done() for t in probe_tasks)


async def test_the_probe_answer_sets_the_exact_reset(proxy, clock: FakeClock) -> None:
    reset_at = clock.now + 2 * 3600_000

    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        if flow.request.path == USAGES:
            assert flow.request.headers["authorization"] == f"Bearer {key}"
            body = {"limits": [{"window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                                "detail": {"resetTime": str(reset_at)}}]}
            return http.Response.make(200, json.dumps(body), {"content-type": "application/json"})
        return kimi_error(429, "You've reached your 5-hour usage limit")

    addon, upstream = proxy(answer, keys=KEYS[:1], kimi_max_attempts=1)
    flow = kimi_flow()
    flow.request.headers["user-agent"] = "claude-cli/2.0"
    await upstream(flow)
    for _ in range(10):  # the probe runs in a task of its own
        await asyncio.sleep(0)
    assert len(addon.polls) == 0
    assert addon.pool.accounts[0].rate_limit_reset_time == reset_at
    probe_flows = [path for path, _ in upstream.seen if path == USAGES]
    assert probe_flows == [USAGES]
    assert len(addon.ledger) == 0
