"""End to end: a request refused on its first key and retried on another gets the retry's
answer event by event, through a real mitmdump on both mitmproxy lines (issue 29).

The fake Kimi holds the retry's stream after its first event (a gate) until the test has
seen that event reach the client: a proxy that handed the retry's answer over whole would
deliver nothing before the gate times out.
"""

from __future__ import annotations

import ssl
import time

import httpx
import pytest

from testbed.fake_kimi import CHAT_COMPLETIONS_PATH, CUT_STREAM, MESSAGES_PATH, mid_stream_error_events
from testbed.processes import start_mitmdump
from tests.support.harness import (
    ADDON_SCRIPT,
    LOOPBACK_DNS,
    accounts_on_disk,
    counts_on_disk,
    counts_seen,
    poll,
    saved_flows,
    sse_events,
    tokens_on_disk,
)
from tests.support.modes import (
    CLIENT_HEADERS,
    FILE_DEADLINE_S,
    MSG,
    PLACEHOLDER,
    STREAM_EVENTS,
    client,
    kimi_base,
)

STREAMED = {**MSG, "stream": True}
GATE_S = 5.0  # how long the fake holds the retry's stream if nobody releases it


def stream_events(c: httpx.Client, url: str, gate) -> tuple[list, bool, httpx.Response]:
    """The answer's events, and whether the first arrived while Kimi still held the rest."""
    with c.stream("POST", url, json=STREAMED, headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER}) as r:
        if r.status_code != 200:
            r.read()
            return [], False, r
        lines = r.iter_lines()
        first = sse_events(lines, limit=1)
        held = gate.wait_reached(GATE_S) and not gate.timed_out
        gate.set()
        return first + sse_events(lines), held, r


@pytest.mark.parametrize("mode", ["reverse", "regular", "regular-tls"])
def test_a_retried_answer_streams_event_by_event(mode, fake_kimi, keys, write_accounts, start_proxy, accounts_path):
    limited, serving = keys[:2]
    write_accounts([limited, serving], "round-robin")
    fake_kimi.set_kimi_error(limited, "too_many_requests")
    gate = fake_kimi.hold_stream_after_first_event(serving, timeout=GATE_S)
    proxy = start_proxy(fake_kimi, mode)
    with client(proxy, mode) as c:
        started = time.monotonic()
        events, held, r = stream_events(c, kimi_base(proxy, mode) + MESSAGES_PATH, gate)
        took = time.monotonic() - started
    assert r.status_code == 200, (r.status_code, r.text, proxy.output())
    assert r.headers["content-type"].startswith("text/event-stream")
    assert held, "the retry's first event only arrived after Kimi released the rest"
    assert [name for name, _ in events] == STREAM_EVENTS
    assert took < GATE_S
    # Each attempt counted on its own key; the file agrees with what Kimi saw.
    assert [(s.key, s.status) for s in fake_kimi.message_requests()] == [(limited, 429), (serving, 200)]
    assert poll(lambda: counts_on_disk(accounts_path, [limited, serving]) == counts_seen(fake_kimi, [limited, serving]),
                FILE_DEADLINE_S), proxy.output()
    assert counts_on_disk(accounts_path, [serving]) == {serving: (1, 1)}
    assert "has crashed" not in proxy.output()  # nothing injected into a stream that was gone


def test_the_client_flow_names_both_attempts_and_the_keys_stay_masked(
    fake_kimi, keys, write_accounts, start_proxy, tmp_path
):
    limited, serving = keys[:2]
    write_accounts([limited, serving], "round-robin")
    fake_kimi.set_kimi_error(limited, "too_many_requests")
    gate = fake_kimi.hold_stream_after_first_event(serving, timeout=GATE_S)
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, extra_args=["-w", str(dump)])
    with client(proxy, "reverse") as c:
        events, held, r = stream_events(c, proxy.url + MESSAGES_PATH, gate)
    assert r.status_code == 200 and held, proxy.output()
    assert [name for name, _ in events] == STREAM_EVENTS
    assert proxy.stop() == 0, proxy.output()
    raw, flows = saved_flows(dump)
    assert limited.encode() not in raw and serving.encode() not in raw
    client_flows = [f for f in flows if "retry_of" not in f.metadata.get("kimi_rotator", {})]
    assert len(client_flows) == 1
    shown = client_flows[0]
    assert shown.response.status_code == 200
    # The chain, with the tokens the streamed answer reported (read on its way through).
    assert shown.comment.startswith("kimi-rotator: [0] Account 0 (sk-kim…key0): rate limited → [1] Account 1 "
                                    "(sk-kim…key1): ok · in "), shown.comment
    attempts = shown.metadata["kimi_rotator"]["attempts"]
    assert [a["outcome"] for a in attempts] == ["rate_limited", "success"]


def test_a_refusal_not_retried_reaches_the_client_as_kimi_sent_it(fake_kimi, keys, write_accounts, start_proxy):
    """Held, judged, and handed over whole: a request error is the client's to see."""
    write_accounts(keys[:2], "round-robin")
    fake_kimi.set_response(keys[0], status=400, body={"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: must be positive"}}, times=1)
    proxy = start_proxy(fake_kimi)
    with client(proxy, "reverse") as c:
        r = c.post(proxy.url + MESSAGES_PATH, json=STREAMED, headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER})
        again = c.post(proxy.url + MESSAGES_PATH, json=MSG, headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER})
    assert r.status_code == 400, proxy.output()
    assert r.json()["error"]["message"] == "max_tokens: must be positive"
    assert again.status_code == 200  # the same connection serves on
    assert [s.key for s in fake_kimi.message_requests()] == [keys[0], keys[1]]


def test_every_key_refusing_gives_the_last_refusal_whole(fake_kimi, keys, write_accounts, start_proxy):
    write_accounts(keys[:2], "round-robin")
    for key in keys[:2]:
        fake_kimi.set_kimi_error(key, "too_many_requests")
    proxy = start_proxy(fake_kimi, options={"kimi_max_wait": "0"})
    with client(proxy, "reverse") as c:
        r = c.post(proxy.url + MESSAGES_PATH, json=STREAMED, headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER})
    assert r.status_code == 429, (r.status_code, r.text)
    assert "retry-after" in r.headers
    assert sorted(s.key for s in fake_kimi.message_requests()) == sorted(keys[:2])


def test_a_retried_stream_that_breaks_off_is_broken_off_for_the_client(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    """The client must not take a cut answer for a whole one: its connection is closed."""
    limited, serving = keys[:2]
    write_accounts([limited, serving], "round-robin")
    fake_kimi.set_kimi_error(limited, "too_many_requests")
    cut = [*mid_stream_error_events()[:3], (CUT_STREAM, "")]
    fake_kimi.set_response(serving, sse_events=cut, times=1)
    proxy = start_proxy(fake_kimi)
    with client(proxy, "reverse") as c, pytest.raises(httpx.RemoteProtocolError):
        with c.stream("POST", proxy.url + MESSAGES_PATH, json=STREAMED,
                      headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER}) as r:
            assert r.status_code == 200
            list(r.iter_lines())
    assert [s.key for s in fake_kimi.message_requests()] == [limited, serving]


def test_the_option_off_gives_the_retried_answer_whole(fake_kimi, keys, write_accounts, start_proxy):
    limited, serving = keys[:2]
    write_accounts([limited, serving], "round-robin")
    fake_kimi.set_kimi_error(limited, "too_many_requests")
    gate = fake_kimi.hold_stream_after_first_event(serving, timeout=1.0)
    proxy = start_proxy(fake_kimi, options={"kimi_stream_retries": "false"})
    with client(proxy, "reverse") as c:
        events, held, r = stream_events(c, proxy.url + MESSAGES_PATH, gate)
    assert r.status_code == 200, proxy.output()
    assert not held  # whole: nothing came before the fake gave up holding
    assert [name for name, _ in events] == STREAM_EVENTS


def test_a_client_leaving_while_the_retry_streams_stops_it(fake_kimi, keys, write_accounts, start_proxy, accounts_path):
    limited, serving = keys[:2]
    write_accounts([limited, serving], "round-robin")
    fake_kimi.set_kimi_error(limited, "too_many_requests")
    gate = fake_kimi.hold_stream_after_first_event(serving, timeout=30)
    proxy = start_proxy(fake_kimi, options={"kimi_max_in_flight": "1", "kimi_max_wait": "3"})
    with client(proxy, "reverse") as c:
        with c.stream("POST", proxy.url + MESSAGES_PATH, json=STREAMED,
                      headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER}) as r:
            assert sse_events(r.iter_lines(), limit=1)[0][0] == "message_start"
        # Leaving the block closed the connection while Kimi still held the retry's stream:
        # the resend stops, and its key's one slot (kimi_max_in_flight=1) is free at once.
        started = time.monotonic()
        r = c.post(proxy.url + MESSAGES_PATH, json=MSG, headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER})
        took = time.monotonic() - started
    gate.set()
    assert r.status_code == 200, (r.status_code, r.text)
    assert took < 2, took
    assert [s.key for s in fake_kimi.message_requests()] == [limited, serving, serving]
    assert proxy.stop() == 0, proxy.output()
    assert counts_on_disk(accounts_path, [limited, serving]) == counts_seen(fake_kimi, [limited, serving])
    account = accounts_on_disk(accounts_path)[1]
    assert account["consecutiveFailures"] == 0, account
    assert "has crashed" not in proxy.output()


def test_a_retry_through_an_upstream_proxy_streams_too(fake_kimi, keys, write_accounts, accounts_path, tmp_path):
    """mitmproxy's upstream mode (a corporate proxy that intercepts TLS): the resend takes
    the same way as the first attempt, and its answer still streams to the client."""
    limited, serving = keys[:2]
    write_accounts([limited, serving], "round-robin")
    fake_kimi.set_kimi_error(limited, "too_many_requests")
    gate = fake_kimi.hold_stream_after_first_event(serving, timeout=GATE_S)
    corporate_dump = tmp_path / "corporate.flows"
    corporate = start_mitmdump(
        addons=[LOOPBACK_DNS], options={"loopback_dns_port": str(fake_kimi.port), "stream_large_bodies": "1"},
        confdir=tmp_path / "corporate", extra_args=("-w", str(corporate_dump)),
    )
    ours = None
    try:
        ours = start_mitmdump(
            addons=[ADDON_SCRIPT], mode=f"upstream:http://127.0.0.1:{corporate.port}",
            options={"kimi_accounts": str(accounts_path), "kimi_status": "off", "kimi_usage_interval": "0",
                     "ssl_verify_upstream_trusted_ca": str(corporate.ca_cert)},
            confdir=tmp_path / "ours",
        )
        trust_ours = ssl.create_default_context(cafile=str(ours.ca_cert))
        with httpx.Client(proxy=ours.url, verify=trust_ours, trust_env=False, timeout=10) as c:
            events, held, r = stream_events(c, "https://api.kimi.com" + MESSAGES_PATH, gate)
        assert r.status_code == 200, (r.text, ours.output())
        assert held, "the retry's first event only arrived after Kimi released the rest"
        assert [name for name, _ in events] == STREAM_EVENTS
    finally:
        if ours is not None:
            ours.stop()
        corporate.stop()
    _, flows = saved_flows(corporate_dump)
    sent = [(f.request.headers["x-api-key"], f.client_conn.tls_established) for f in flows
            if f.request.path == MESSAGES_PATH]
    assert sent == [(limited, True), (serving, True)]  # both attempts the corporate way


def test_a_refusal_without_a_body_is_retried_too(fake_kimi, keys, write_accounts, start_proxy):
    """A refusal that ends with its headers never reaches the held stream: it goes the
    usual way (judged in `response`) and the retry's answer arrives whole."""
    refused, serving = keys[:2]
    write_accounts([refused, serving], "round-robin")
    fake_kimi.set_response(refused, status=401, body=b"", times=1)
    proxy = start_proxy(fake_kimi)
    with client(proxy, "reverse") as c:
        r = c.post(proxy.url + MESSAGES_PATH, json=STREAMED, headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER})
        again = c.post(proxy.url + MESSAGES_PATH, json=MSG, headers={**CLIENT_HEADERS, "x-api-key": PLACEHOLDER})
    assert r.status_code == 200, (r.status_code, r.text, proxy.output())
    assert [name for name, _ in sse_events(iter(r.text.splitlines()))] == STREAM_EVENTS
    assert again.status_code == 200
    assert [(s.key, s.status) for s in fake_kimi.message_requests()] == [(refused, 401), (serving, 200), (serving, 200)]
    assert "has crashed" not in proxy.output()


@pytest.mark.parametrize("path", [MESSAGES_PATH, CHAT_COMPLETIONS_PATH])
def test_a_retried_stream_counts_the_tokens_kimi_reported(
    path, fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    """The relayed stream is read for usage on its way (both shapes): the serving key's
    saved tokens are what Kimi reported, exactly; the refused key spent none."""
    limited, serving = keys[:2]
    write_accounts([limited, serving], "round-robin")
    envelope = "anthropic" if path == MESSAGES_PATH else "openai"
    fake_kimi.set_kimi_error(limited, "too_many_requests", envelope=envelope, path=path)
    fake_kimi.report_tokens(fresh=120, output=33, cache_read=4000, cache_write=250)
    proxy = start_proxy(fake_kimi)
    headers = (CLIENT_HEADERS | {"x-api-key": PLACEHOLDER} if path == MESSAGES_PATH
               else {"authorization": f"Bearer {PLACEHOLDER}", "User-Agent": "KimiCLI/1.0"})
    with client(proxy, "reverse") as c, c.stream("POST", proxy.url + path, json=STREAMED, headers=headers) as r:
        body = r.read()
    assert r.status_code == 200, (body, proxy.output())
    assert r.headers["content-type"].startswith("text/event-stream")
    assert [(s.key, s.status) for s in fake_kimi.requests if s.path == path] == [(limited, 429), (serving, 200)]
    reported = fake_kimi.tokens_reported()
    assert list(reported) == [serving]
    assert poll(lambda: tokens_on_disk(accounts_path) == reported, FILE_DEADLINE_S), (tokens_on_disk(accounts_path), reported)
