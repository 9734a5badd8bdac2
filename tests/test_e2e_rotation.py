"""End to end: a real mitmdump with the addon, a fake Kimi server and an httpx client.

Everything stays on 127.0.0.1: reverse mode points at the fake server, regular mode
uses the loopback DNS shim (tests/support/loopback_dns.py) so ``api.kimi.com`` reaches it.

Tests about the order of keys after a failure set ``kimi_max_attempts=1`` (no
transparent retry on another key) and check what the fake server saw, not what the
client got for the failed request.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from rotator.core.keys import mask_key, mask_key_ascii
from testbed.fake_kimi import MESSAGES_PATH, FakeKimi, kimi_error
from tests.support.harness import accounts_on_disk, counts_on_disk, counts_seen, poll, saved_flows, sse_events
from tests.support.modes import (
    CLIENT_HEADERS, FILE_DEADLINE_S, MSG, PLACEHOLDER, STREAM_EVENTS, USER_AGENT, client, kimi_base,
)

NO_RETRY = {"kimi_max_attempts": "1"}  # no transparent retry on another key


# -- helpers -------------------------------------------------------------------------


def send(c: httpx.Client, base: str, key: str | None = PLACEHOLDER, *, bearer: bool = False,
         body: dict = MSG, headers: dict[str, str] | None = None) -> httpx.Response:
    sent = {**CLIENT_HEADERS, **(headers or {})}
    if key is not None:
        if bearer:
            sent["Authorization"] = f"Bearer {key}"
        else:
            sent["x-api-key"] = key
    return c.post(base + MESSAGES_PATH, json=body, headers=sent)


def counts_match(path: Path, fake: FakeKimi, keys: list[str]) -> bool:
    return counts_on_disk(path, keys) == counts_seen(fake, keys)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- 1. upstream sees pool keys only; 7. reverse and regular mode ----------------------


@pytest.mark.parametrize("mode", ["reverse", "regular", "regular-tls"])
def test_upstream_sees_only_pool_keys_where_the_client_put_its_own(
    mode, fake_kimi, keys, write_accounts, start_proxy
):
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi, "regular" if mode.startswith("regular") else "reverse")
    base = kimi_base(proxy, mode)
    with client(proxy, mode) as c:
        answers = [
            send(c, base, PLACEHOLDER),  # x-api-key client
            send(c, base, PLACEHOLDER, bearer=True),  # Authorization: Bearer client
            send(c, base, None),  # no key at all
        ]
    assert [r.status_code for r in answers] == [200, 200, 200], proxy.output()
    assert all(r.json()["content"][0]["text"].startswith("hello from fake kimi") for r in answers)

    seen = fake_kimi.message_requests()
    assert [s.key for s in seen] == keys  # round-robin: 0, 1, 2
    x_api, bearer, keyless = seen
    assert x_api.headers["x-api-key"] == keys[0]
    assert "authorization" not in x_api.headers
    assert bearer.headers["authorization"] == f"Bearer {keys[1]}"
    assert "x-api-key" not in bearer.headers
    assert keyless.headers["x-api-key"] == keys[2]
    assert "authorization" not in keyless.headers
    for s in seen:
        assert PLACEHOLDER not in repr(s.raw_headers)
        assert PLACEHOLDER.encode() not in s.body
        assert ("User-Agent", USER_AGENT) in s.raw_headers
        assert ("X-Msh-Platform", "kimi_cli") in s.raw_headers
        assert s.json == MSG
        if mode != "reverse":
            assert s.host == "api.kimi.com"


# -- 2. order of keys per strategy -------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "active_index", "expected"),
    [
        ("round-robin", 0, [0, 1, 2, 0, 1, 2, 0]),
        ("sticky", 0, [0] * 7),
        ("health-based", 1, [1] * 7),
    ],
)
def test_order_of_keys_per_strategy(
    strategy, active_index, expected, fake_kimi, keys, write_accounts, start_proxy
):
    write_accounts(keys, strategy, active_index=active_index)
    proxy = start_proxy(fake_kimi)
    with client(proxy, "reverse") as c:
        statuses = [send(c, proxy.url).status_code for _ in expected]
    assert statuses == [200] * len(expected), proxy.output()
    assert fake_kimi.keys_seen() == [keys[i] for i in expected]


# -- 3. a 429 moves the next request and cools the key -------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "cooldown_ms"), [(None, 60_000), ("5", 5_000)], ids=["default-60s", "retry-after-5"]
)
def test_rate_limit_moves_to_next_key_and_cools_it_in_the_file(
    retry_after, cooldown_ms, fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    write_accounts(keys, "sticky")
    status, body = kimi_error("too_many_requests")
    assert status == 429
    fake_kimi.set_response(
        keys[0], status, body, headers={"retry-after": retry_after} if retry_after else None, times=1
    )
    proxy = start_proxy(fake_kimi, options=NO_RETRY)
    with client(proxy, "reverse") as c:
        send(c, proxy.url)  # the 429; what the client gets depends on retries
        later = [send(c, proxy.url).status_code for _ in range(3)]
    assert later == [200, 200, 200], proxy.output()
    assert fake_kimi.keys_seen() == [keys[0], keys[1], keys[1], keys[1]]
    limited_at_ms = fake_kimi.requests[0].time * 1000

    cooling = poll(lambda: accounts_on_disk(accounts_path)[0]["rateLimitResetTime"], FILE_DEADLINE_S)
    assert cooling, "the 429 never reached the accounts file"
    assert cooling > now_ms(), "key 0 should still be cooling"
    assert abs(cooling - (limited_at_ms + cooldown_ms)) < 2_000, (cooling - limited_at_ms)
    others = accounts_on_disk(accounts_path)[1:]
    assert [a["rateLimitResetTime"] for a in others] == [0, 0]


# -- 4. the accounts file reflects the counts ---------------------------------------------


def test_counts_reach_the_file_while_running(fake_kimi, keys, write_accounts, start_proxy, accounts_path):
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[2], "server_error", times=1)  # one failure: successes < requests
    proxy = start_proxy(fake_kimi)
    with client(proxy, "reverse") as c:
        statuses = [send(c, proxy.url).status_code for _ in range(7)]
    assert statuses == [200, 200, 500, 200, 200, 200, 200], proxy.output()
    expected = counts_seen(fake_kimi, keys)
    assert expected == {keys[0]: (3, 3), keys[1]: (2, 2), keys[2]: (2, 1)}

    assert poll(lambda: counts_match(accounts_path, fake_kimi, keys), FILE_DEADLINE_S), (
        counts_on_disk(accounts_path, keys), expected)
    assert proxy.returncode is None  # saved by the running proxy, not by a shutdown


def test_counts_are_saved_on_stop(fake_kimi, keys, write_accounts, start_proxy, accounts_path):
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[1], "server_error", times=1)
    # No periodic save during the test: what is in the file comes from the final save.
    proxy = start_proxy(fake_kimi, options={"kimi_flush_interval": "3600"})
    with client(proxy, "reverse") as c:
        for _ in range(5):
            send(c, proxy.url)
    assert fake_kimi.count_by_key() == {keys[0]: 2, keys[1]: 2, keys[2]: 1}
    assert counts_on_disk(accounts_path, keys) == {k: (0, 0) for k in keys}

    assert proxy.stop() == 0, proxy.output()
    assert counts_on_disk(accounts_path, keys) == counts_seen(fake_kimi, keys)
    assert counts_on_disk(accounts_path, keys)[keys[1]] == (2, 1)


# -- 5. SSE events reach the client one by one ------------------------------------------


@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_sse_events_reach_the_client_one_by_one(
    mode, fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    write_accounts(keys, "sticky")
    proxy = start_proxy(fake_kimi, mode)
    gate = fake_kimi.hold_stream_after_first_event(timeout=5)
    with client(proxy, mode) as c, c.stream(
        "POST", kimi_base(proxy, mode) + MESSAGES_PATH, json={**MSG, "stream": True},
        headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER},
    ) as r:
        assert r.status_code == 200, proxy.output()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = sse_events(lines, limit=1)
        # The first event arrived while the server was still holding the rest (had the
        # proxy buffered it, it would only come once the gate timed out).
        held = gate.wait_reached(5) and not gate.timed_out
        gate.set()
        rest = sse_events(lines)
    assert [name for name, _ in first] == ["message_start"]
    assert held, "the first event only arrived after the server released the stream"
    events = first + rest
    assert [name for name, _ in events] == STREAM_EVENTS
    text = "".join(d["delta"]["text"] for name, d in events if name == "content_block_delta")
    assert text == "hello from fake kimi #1"
    assert fake_kimi.keys_seen() == [keys[0]]
    # A streamed success is counted like any other.
    assert poll(lambda: counts_on_disk(accounts_path, keys[:1]) == {keys[0]: (1, 1)}, FILE_DEADLINE_S)


def test_a_client_hanging_up_does_not_hurt_the_key(fake_kimi, keys, write_accounts, start_proxy, accounts_path):
    """A person interrupting their agent mid-answer is not the key's fault."""
    write_accounts(keys[:1], "sticky")
    proxy = start_proxy(fake_kimi)
    gate = fake_kimi.hold_stream_after_first_event(timeout=5)
    with client(proxy, "reverse") as c:
        with c.stream("POST", proxy.url + MESSAGES_PATH, json={**MSG, "stream": True},
                      headers={"x-api-key": PLACEHOLDER}) as r:
            assert sse_events(r.iter_lines(), limit=1)[0][0] == "message_start"
        # Leaving the block closes the connection while the server still holds the stream.
        slow = {**MSG, "stream": True}
        fake_kimi.set_default(delay=3.0)
        with pytest.raises(httpx.ReadTimeout):
            c.post(proxy.url + MESSAGES_PATH, json=slow, headers={"x-api-key": PLACEHOLDER}, timeout=0.3)
    gate.set()

    assert poll(lambda: counts_on_disk(accounts_path)[keys[0]][0] == 2, 6), proxy.output()
    account = accounts_on_disk(accounts_path)[0]
    assert account["healthScore"] == 100 and account["consecutiveFailures"] == 0
    # The stream that had begun counts as a success; the request abandoned before any
    # answer is neither a success nor a failure.
    assert counts_on_disk(accounts_path)[keys[0]] == (2, 1)


@pytest.mark.parametrize("mode", ["reverse", "regular-tls"])
def test_a_client_leaving_during_a_retry_cancels_it_and_frees_the_key(
    mode, fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    """The README's "the client leaves -> nothing more is sent", for a retry: the stalled
    resend is cut, its key free at once, and nothing counted for or against it."""
    limited, stalling = keys[:2]
    write_accounts([limited, stalling], "round-robin")
    fake_kimi.set_kimi_error(limited, "too_many_requests")  # at once; cools it 60 s
    fake_kimi.set_response(stalling, delay=30, until_closed=True, times=1)  # the retry stalls
    # One request per key at a time: a resend that kept its slot would hold the key.
    proxy = start_proxy(fake_kimi, mode, options={"kimi_max_in_flight": "1", "kimi_max_wait": "3"})
    base = kimi_base(proxy, mode)
    with client(proxy, mode) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(base + MESSAGES_PATH, json=MSG, headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER}, timeout=1.5)
        left = time.monotonic()
        resent = [s for s in fake_kimi.message_requests() if s.key == stalling]
        assert len(resent) == 1, (fake_kimi.keys_seen(), proxy.output())
        # The proxy closed the stalled resend's connection as the client left.
        assert poll(lambda: resent[0].closed is not None, 5), proxy.output()
        assert resent[0].closed - left < 2
        started = time.monotonic()
        r = send(c, base)  # the limited key still cools: the stalling one serves, at once
        took = time.monotonic() - started
    assert r.status_code == 200, (r.status_code, r.text)
    assert took < 2, took  # not a wait for the slot, nor "every key is cooling" after it
    assert [(s.key, s.status) for s in fake_kimi.message_requests()] == [
        (limited, 429), (stalling, None), (stalling, 200)
    ]
    assert proxy.stop() == 0, proxy.output()
    # The cut resend reached Kimi (a request), answered nothing: no success, no failure.
    assert counts_on_disk(accounts_path, [limited, stalling]) == counts_seen(fake_kimi, [limited, stalling])
    assert counts_on_disk(accounts_path, [stalling]) == {stalling: (2, 1)}
    account = accounts_on_disk(accounts_path)[1]
    assert account["healthScore"] == 100 and account["consecutiveFailures"] == 0, account
    assert "connection to Kimi failed" not in proxy.output()


# -- 6. other hosts pass untouched: tests/test_security.py
#    test_other_hosts_and_lookalikes_get_no_key_pass_unchanged_and_are_not_counted
# -- 8. no keys, then a key added with the CLI: tests/test_durability.py
#    test_proxy_started_without_a_file_serves_a_key_added_later


# -- 9. a bad option value stops the proxy with a clear message -------------------------------
# Every bad value is checked in-process (tests/test_addon.py
# test_bad_options_stop_the_proxy_with_a_message); this is the one real mitmdump start.


def test_bad_option_value_stops_the_proxy(fake_kimi, start_proxy):
    name = "kimi_max_wait"
    with pytest.raises(RuntimeError) as failed:
        start_proxy(fake_kimi, options={name: "soon"})
    report = str(failed.value)
    code = re.search(r"\(exit code (-?\d+)\)", report)
    assert code and int(code.group(1)) > 0, report  # exited by itself, was not killed
    output = report.split("--- output ---", 1)[1]
    assert re.search(rf"OptionsError: {name}\b|\b{name} must\b|{name}: ", output), output
    assert "unsupported option type" not in output.lower(), output


# -- 10. flows are annotated, and saved flows hold no key -----------------------------------


def test_saved_flows_name_account_masked_key_and_outcome(
    fake_kimi, keys, write_accounts, start_proxy, tmp_path
):
    write_accounts(keys, "round-robin")
    status, body = kimi_error("too_many_requests")
    fake_kimi.set_response(keys[1], status, body, times=1)
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, options=NO_RETRY, extra_args=("-w", str(dump)))
    with client(proxy, "reverse") as c:
        for _ in range(3):
            send(c, proxy.url)  # key 0 ok, key 1 rate limited, key 2 ok
        with c.stream("POST", proxy.url + MESSAGES_PATH, json={**MSG, "stream": True},
                      headers={"x-api-key": PLACEHOLDER}) as r:
            assert len(sse_events(r.iter_lines())) == len(STREAM_EVENTS)  # key 0 again
    assert fake_kimi.keys_seen() == [keys[0], keys[1], keys[2], keys[0]]
    assert proxy.stop() == 0, proxy.output()

    raw, flows = saved_flows(dump)
    for key in keys:
        assert key.encode() not in raw
    assert len(flows) == 4
    expected = [(0, "success"), (1, "rate_limited"), (2, "success"), (0, "success")]
    for flow, (index, outcome) in zip(flows, expected):
        attempts = flow.metadata["kimi_rotator"]["attempts"]
        assert len(attempts) == 1
        assert attempts[-1]["account"] == f"Account {index}"
        assert attempts[-1]["key"] == mask_key(keys[index])
        assert attempts[-1]["outcome"] == outcome
        assert outcome in flow.comment
        assert mask_key(keys[index]) in flow.comment
        assert flow.request.headers["x-api-key"] == mask_key_ascii(keys[index])


# A retried request in a saved dump: tests/test_e2e_failures.py
# test_saved_dump_lists_every_attempt_without_keys.
