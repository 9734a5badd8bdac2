"""Hostile or odd traffic through a real mitmdump (issue 13: defects 1, 6, 8 and 10).

- 1: `stream_large_bodies`: a request body over the limit has its headers sent before the
  `request` hook runs; the pool key must be on them, and a refusal of such a request is
  passed on (its body cannot be resent).
- 6: a gzip bomb in an error body is read only as far as the policy scans.
- 8: a client that hangs up while its request waits for a key, or for a retry, spends
  no quota and is not counted.
- 10: `--set kimi_hosts=a,b` means two hosts.

Real proxies in reverse mode in front of testbed/fake_kimi.py, all on 127.0.0.1; the
in-process tests use mitmproxy's test helpers.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import tflow, tutils

from rotator.core.keys import mask_key, mask_key_ascii
from rotator.core.policy import BODY_SCAN_LIMIT
from rotator.proxy.options import parse_hosts
from testbed.fake_kimi import MESSAGES_PATH, FakeKimi, kimi_error
from testbed.hooks import call_hook
from testbed.processes import Proxy
from tests.support.accounts import fake_key
from tests.support.harness import counts_on_disk, poll, saved_flows
from tests.support.harness import accounts_on_disk as accounts
from tests.support.in_process import addon_in_taddons, configure_with_keys

PLACEHOLDER = "sk-kimi-placeholder"
CLIENT_HEADERS = {"x-api-key": PLACEHOLDER, "anthropic-version": "2023-06-01"}
FILE_DEADLINE_S = 10.0


def big_message(size: int = 8 * 1024) -> dict:
    return {"model": "kimi-for-coding", "max_tokens": 16,
            "messages": [{"role": "user", "content": "x" * size}]}


def client(timeout: float = 15.0) -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=timeout)


def messages(fake: FakeKimi) -> list:
    return fake.message_requests()


@pytest.fixture
def two_keys() -> list[str]:
    return [fake_key(f"key{i}") for i in range(2)]


# -- 1. stream_large_bodies --------------------------------------------------------------


def chunks(payload: bytes, size: int = 1024) -> Iterator[bytes]:
    for i in range(0, len(payload), size):
        yield payload[i:i + size]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_streamed_request_body_goes_out_with_a_pool_key(
    fake_kimi, two_keys, write_accounts, start_proxy, accounts_path, framing
):
    write_accounts(two_keys, "round-robin")
    # What Kimi answers the placeholder: if it ever got there, a pool key would be blamed.
    fake_kimi.set_kimi_error(PLACEHOLDER, "invalid_auth")
    proxy = start_proxy(fake_kimi, options={"stream_large_bodies": "1k"})
    payload = json.dumps(big_message()).encode()

    with client() as c:
        for _ in range(3):
            if framing == "chunked":
                r = c.post(proxy.url + MESSAGES_PATH, content=chunks(payload),
                           headers={**CLIENT_HEADERS, "content-type": "application/json"})
            else:
                r = c.post(proxy.url + MESSAGES_PATH, content=payload,
                           headers={**CLIENT_HEADERS, "content-type": "application/json"})
            assert r.status_code == 200, r.text
    seen = messages(fake_kimi)
    assert [s.key for s in seen] == [two_keys[0], two_keys[1], two_keys[0]]
    assert all(s.body == payload for s in seen)
    assert proxy.stop() == 0, proxy.output()
    on_disk = accounts(accounts_path)
    assert [a.get("disabledReason") for a in on_disk] == [None, None], on_disk
    assert counts_on_disk(accounts_path) == {two_keys[0]: (2, 2), two_keys[1]: (1, 1)}, on_disk


def test_a_refused_streamed_request_is_passed_on_not_resent(
    fake_kimi, two_keys, write_accounts, start_proxy, accounts_path, tmp_path
):
    write_accounts(two_keys, "round-robin")
    fake_kimi.set_kimi_error(two_keys[0], "overloaded", headers={"retry-after": "30"})
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, options={"stream_large_bodies": "1k"}, extra_args=("-w", str(dump)))

    with client() as c:
        r = c.post(proxy.url + MESSAGES_PATH, json=big_message(), headers=CLIENT_HEADERS)
        # Not resendable: the client gets Kimi's refusal at once, not a retry without a body.
        assert r.status_code == 429, r.text
        assert [s.key for s in messages(fake_kimi)] == [two_keys[0]]
        # A small body is still retried elsewhere.
        small = c.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
        assert small.status_code == 200, small.text
    assert proxy.stop() == 0, proxy.output()
    on_disk = accounts(accounts_path)
    assert on_disk[0]["rateLimitResetTime"] > time.time() * 1000  # the key did carry it
    _, flows = saved_flows(dump)
    refused = [f for f in flows if f.response is not None and f.response.status_code == 429]
    assert len(refused) == 1, [f.comment for f in flows]
    assert "streamed" in refused[0].comment and "not retried" in refused[0].comment, refused[0].comment


def kimi_flow(stream: bool, key: str | None = PLACEHOLDER) -> http.HTTPFlow:
    request = tutils.treq(host="api.kimi.com", port=443, path=b"/coding/v1/messages")
    request.scheme = "https"
    if key is not None:
        request.headers["x-api-key"] = key
    request.stream = stream
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = ("127.0.0.1", 50000)
    return flow


async def test_requestheaders_puts_the_key_on_a_streamed_request_only(tmp_path):
    key = fake_key("pool0")
    with addon_in_taddons(None, Proxyserver()) as (addon, tctx):  # Proxyserver owns stream_large_bodies
        configure_with_keys(tctx, addon, tmp_path, [key], stream_large_bodies="1k")
        streamed = kimi_flow(stream=True)
        await call_hook(addon, "requestheaders", streamed)
        assert streamed.request.headers["x-api-key"] == key
        assert addon.pool.in_flight == {key: 1}
        await call_hook(addon, "request", streamed)  # the body has been streamed meanwhile
        assert addon.pool.in_flight == {key: 1}  # one lease, not two
        assert addon.pool.accounts[0].total_requests == 1

        normal = kimi_flow(stream=False)
        normal.request.headers["content-length"] = "10"
        await call_hook(addon, "requestheaders", normal)
        assert normal.request.headers["x-api-key"] == PLACEHOLDER  # the request hook does it
        await call_hook(addon, "request", normal)
        assert normal.request.headers["x-api-key"] == key


async def test_without_stream_large_bodies_there_is_no_requestheaders_hook(tmp_path):
    with addon_in_taddons(None, Proxyserver()) as (addon, tctx):
        configure_with_keys(tctx, addon, tmp_path, [fake_key("pool0")])
        assert getattr(addon, "requestheaders", None) is None  # the hot path costs nothing more
        tctx.configure(addon, stream_large_bodies="1m")
        assert getattr(addon, "requestheaders", None) is not None
        tctx.configure(addon, stream_large_bodies=None)
        assert getattr(addon, "requestheaders", None) is None


async def test_a_request_streamed_before_any_key_is_not_charged(tmp_path):
    key = fake_key("pool0")
    with addon_in_taddons(None, Proxyserver()) as (addon, tctx):
        configure_with_keys(tctx, addon, tmp_path, [key])
        # Its headers went out already (streamed with no requestheaders chance): no key now.
        flow = kimi_flow(stream=True)
        await call_hook(addon, "request", flow)
        assert flow.request.headers["x-api-key"] == PLACEHOLDER
        assert addon.pool.in_flight == {}
        assert addon.pool.accounts[0].total_requests == 0
        assert "streamed" in flow.comment


async def test_a_streamed_request_with_no_key_is_closed_not_crashed(tmp_path):
    with addon_in_taddons(None, Proxyserver()) as (addon, tctx):
        configure_with_keys(tctx, addon, tmp_path, [], stream_large_bodies="1k")
        flow = kimi_flow(stream=True)
        await call_hook(addon, "requestheaders", flow)
        # mitmproxy cannot answer a request it streams: set a response and it crashes.
        assert flow.response is None
        assert flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
        assert "no key" in flow.comment


# -- 6. gzip bombs ------------------------------------------------------------------------


def bomb(error: str, total: int) -> bytes:
    """Kimi's `error` answer padded with `total` bytes of spaces, gzipped (~1/1000)."""
    head = json.dumps(kimi_error(error)[1])[:-2].encode()  # open the error object
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [compressor.compress(head + b', "pad": "')]
    block = b" " * (1 << 20)
    for _ in range(total >> 20):
        out.append(compressor.compress(block))
    out.append(compressor.compress(b'"}}'))
    out.append(compressor.flush())
    return b"".join(out)


def peak_rss_kib(proxy: Proxy) -> int:
    status = Path(f"/proc/{proxy.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


GZIP_JSON = {"content-type": "application/json", "content-encoding": "gzip"}


def test_a_gzip_bomb_in_an_error_body_is_read_only_as_far_as_it_is_scanned(
    fake_kimi, two_keys, write_accounts, start_proxy, accounts_path
):
    write_accounts(two_keys, "round-robin")
    size = 200 << 20  # 200 MiB of padding each, about 200 KB on the wire
    # (The warm-up below goes to key 0, the first message to key 1.)
    # Key 1: its weekly limit, in a bomb; the request is retried on key 0.
    fake_kimi.set_response(two_keys[1], 403, bomb("weekly", size), GZIP_JSON, times=1)
    # Key 0: serves that, then answers a 500 bomb, passed on as Kimi sent it.
    fake_kimi.set_response(two_keys[0], 200, times=1)
    server_error = bomb("server_error", size)
    fake_kimi.add_response(two_keys[0], 500, server_error, GZIP_JSON, times=1)
    proxy = start_proxy(fake_kimi)

    with client() as c:
        warm = c.get(proxy.url + "/coding/v1/models", headers=CLIENT_HEADERS)  # a normal flow first
        assert warm.status_code == 200
        before = peak_rss_kib(proxy)
        first = c.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
        assert first.status_code == 200, first.text
        with c.stream("POST", proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS) as second:
            assert second.status_code == 500
            # The client still gets the (compressed) body untouched.
            assert second.headers["content-encoding"] == "gzip"
            assert b"".join(second.iter_raw()) == server_error
        grown = peak_rss_kib(proxy) - before
    assert grown < 40 * 1024, f"mitmdump's peak memory grew by {grown // 1024} MiB"
    assert [s.key for s in messages(fake_kimi)] == [two_keys[1], two_keys[0], two_keys[0]]
    assert proxy.stop() == 0, proxy.output()
    # Still read as the weekly limit (7 days, not a 5-minute refusal): the wording is in
    # the first 64 KiB.
    on_disk = accounts(accounts_path)
    assert on_disk[1]["rateLimitResetTime"] > (time.time() + 86400) * 1000, on_disk


def encoded(name: str, data: bytes) -> bytes:
    if name == "gzip":
        return gzip.compress(data)
    if name == "deflate":
        return zlib.compress(data)
    if name == "deflateraw":
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()
    from mitmproxy.net import encoding

    return encoding.encode(data, name)


@pytest.mark.parametrize("name", ["gzip", "deflate", "deflateraw", "br", "zstd", "identity"])
def test_error_bodies_are_decoded_no_further_than_the_scan_limit(name):
    text = b'{"error": {"message": "too many requests"}, "pad": "' + b" " * (4 << 20) + b'"}'
    header = "deflate" if name == "deflateraw" else name
    response = tutils.tresp(content=b"")
    response.headers["content-encoding"] = header
    response.raw_content = encoded(name, text)
    from rotator.proxy import bodies

    got = bodies.body_start(response)
    if got is None:  # a decoder that cannot stop at a limit is not used
        assert name == "br"
        return
    assert got == text[:BODY_SCAN_LIMIT]
    assert response.raw_content == encoded(name, text)  # the client's copy is untouched


def test_broken_or_unknown_encodings_give_the_raw_prefix():
    from rotator.proxy import bodies

    response = tutils.tresp(content=b"")
    response.headers["content-encoding"] = "gzip"
    response.raw_content = b"not gzip" * 20000
    assert bodies.body_start(response) == (b"not gzip" * 20000)[:BODY_SCAN_LIMIT]
    response.headers["content-encoding"] = "x-unknown"
    assert bodies.body_start(response) == (b"not gzip" * 20000)[:BODY_SCAN_LIMIT]


# -- 8. clients that leave ---------------------------------------------------------------


def test_no_retry_goes_out_after_the_client_has_left(
    fake_kimi, write_accounts, start_proxy, accounts_path
):
    key = fake_key("only")
    write_accounts([key])
    fake_kimi.set_kimi_error(key, "overloaded", times=1, headers={"retry-after": "3"})
    proxy = start_proxy(fake_kimi, options={"kimi_max_wait": "20"})

    with client(timeout=1.0) as impatient:
        with pytest.raises(httpx.TimeoutException):
            impatient.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
    assert len(messages(fake_kimi)) == 1
    # A patient client behind it: served when the key frees, after the one that left
    # would have been resent.
    with client() as patient:
        r = patient.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
    assert r.status_code == 200, r.text
    assert [s.status for s in messages(fake_kimi)] == [429, 200]
    assert proxy.stop() == 0, proxy.output()
    assert counts_on_disk(accounts_path) == {key: (2, 1)}, accounts(accounts_path)


def test_requests_abandoned_while_waiting_for_a_key_are_not_counted(
    fake_kimi, write_accounts, start_proxy, accounts_path
):
    key = fake_key("only")
    write_accounts([key])
    fake_kimi.set_kimi_error(key, "overloaded", times=1, headers={"retry-after": "3"})
    proxy = start_proxy(fake_kimi, options={"kimi_max_wait": "20", "kimi_max_attempts": "1"})

    with client() as c:
        first = c.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
        assert first.status_code == 429  # one attempt only: passed on, the key cools 3 s
    for _ in range(4):
        with client(timeout=0.5) as impatient:
            with pytest.raises(httpx.TimeoutException):
                impatient.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
    with client() as patient:
        r = patient.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
    assert r.status_code == 200, r.text
    assert [s.status for s in messages(fake_kimi)] == [429, 200]
    assert proxy.stop() == 0, proxy.output()
    assert counts_on_disk(accounts_path) == {key: (2, 1)}, accounts(accounts_path)


# -- 10. kimi_hosts -------------------------------------------------------------------------


def test_comma_separated_hosts_are_several_hosts():
    assert parse_hosts(["api.kimi.com,api.moonshot.ai"]) == {"api.kimi.com", "api.moonshot.ai"}
    assert parse_hosts(["API.kimi.com , api.moonshot.ai.", "x.test"]) == {
        "api.kimi.com", "api.moonshot.ai", "x.test"}
    with pytest.raises(ValueError):
        parse_hosts([" , "])


def test_kimi_hosts_from_the_command_line_split_on_commas(tmp_path):
    with addon_in_taddons(None, Proxyserver()) as (addon, tctx):
        configure_with_keys(tctx, addon, tmp_path, [fake_key("pool0")])
        tctx.options.set("kimi_hosts=api.kimi.com,api.moonshot.ai")  # as --set parses it
        assert addon.settings.hosts == {"api.kimi.com", "api.moonshot.ai"}
        for host in ("api.kimi.com", "api.moonshot.ai"):
            flow = tflow.tflow(req=tutils.treq(host=host, port=443))
            assert addon.is_kimi_request(flow)


def test_kimi_hosts_with_a_comma_reach_the_pool_end_to_end(
    fake_kimi, write_accounts, start_proxy
):
    key = fake_key("pool0")
    write_accounts([key])
    proxy = start_proxy(fake_kimi, options={"kimi_hosts": "api.kimi.com,127.0.0.1"})
    with client() as c:
        r = c.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
    assert r.status_code == 200, r.text
    assert [s.key for s in messages(fake_kimi)] == [key]
    assert mask_key(key) not in r.text


def test_a_streamed_request_that_no_key_can_serve_is_closed_without_a_crash(
    fake_kimi, write_accounts, start_proxy
):
    write_accounts([])
    proxy = start_proxy(fake_kimi, options={"stream_large_bodies": "1k"})
    with client() as c:
        with pytest.raises(httpx.TransportError):
            c.post(proxy.url + MESSAGES_PATH, json=big_message(), headers=CLIENT_HEADERS)
        # A small body still gets the proxy's own answer, saying what to do.
        small = c.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
    assert small.status_code == 503 and "add-key" in small.text, small.text
    assert messages(fake_kimi) == []
    assert proxy.stop() == 0
    output = proxy.output()
    assert "crashed" not in output and "Traceback" not in output, output
    assert output.count("could not be served") == 1, output  # said once, with what to do


def test_a_client_leaving_halfway_through_a_streamed_upload_is_not_charged(
    fake_kimi, two_keys, write_accounts, start_proxy, accounts_path
):
    import socket

    write_accounts(two_keys[:1])
    proxy = start_proxy(fake_kimi, options={"stream_large_bodies": "1k"})
    head = (
        f"POST {MESSAGES_PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"x-api-key: {PLACEHOLDER}\r\ncontent-length: 5000\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        # 2,000 of the 5,000 bytes promised, then the client leaves: the proxy reads the
        # headers (and puts the pool key on) before it reads the end of the connection.
        s.sendall(head + b"{" + b" " * 1999)
    assert poll(lambda: counts_on_disk(accounts_path) == {two_keys[0]: (1, 0)}, 5), counts_on_disk(accounts_path)
    proxy.stop()
    (entry,) = accounts(accounts_path)
    assert entry["healthScore"] == 100 and entry["consecutiveFailures"] == 0, entry
    assert entry.get("disabledReason") is None and entry["rateLimitResetTime"] == 0, entry


@pytest.mark.parametrize(
    "offered, unreadable, sent",
    [
        ("gzip, deflate, br", {"br"}, "gzip, deflate"),
        ("BR;q=1.0, gzip;q=0.5", {"br"}, "gzip;q=0.5"),
        ("br", {"br"}, "identity"),
        ("gzip, br", set(), "gzip, br"),
        ("gzip, zstd", {"br"}, "gzip, zstd"),
    ],
)
def test_unreadable_encodings_are_not_offered_to_kimi(offered, unreadable, sent):
    from rotator.proxy.headers import replace_client_key

    headers = http.Headers([(b"Accept-Encoding", offered.encode()), (b"x-api-key", b"k")])
    replace_client_key(headers, "sk-kimi-pool", unreadable=frozenset(unreadable))  # one pass does both
    assert headers.fields == ((b"Accept-Encoding", sent.encode()), (b"x-api-key", b"sk-kimi-pool"))


def test_kimi_is_offered_only_encodings_whose_refusals_the_proxy_can_read(
    fake_kimi, two_keys, write_accounts, start_proxy
):
    from rotator.proxy.bodies import DECODERS

    write_accounts(two_keys[:1])
    proxy = start_proxy(fake_kimi)
    with client() as c:
        r = c.post(proxy.url + MESSAGES_PATH, json=big_message(10),
                   headers={**CLIENT_HEADERS, "accept-encoding": "gzip, deflate, br, zstd"})
        assert r.status_code == 200, r.text
    (seen,) = messages(fake_kimi)
    offered = [c.strip() for c in seen.headers["accept-encoding"].split(",")]
    assert offered and all(DECODERS.get(c) is not None for c in offered), offered
    assert "gzip" in offered  # what can be read is still offered


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_a_key_kimi_quotes_back_reaches_neither_client_nor_saved_flow(
    encoding, fake_kimi, two_keys, write_accounts, start_proxy, tmp_path
):
    key = two_keys[0]
    body = json.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                  "message": f"bad request from {key}"}}).encode()
    headers = {"content-type": "application/json", "x-echo-key": key}
    if encoding == "gzip":
        body, headers["content-encoding"] = gzip.compress(body), "gzip"
    write_accounts([key])
    fake_kimi.set_response(key, 400, body, headers)
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, extra_args=("-w", str(dump)))
    with client() as c:
        r = c.post(proxy.url + MESSAGES_PATH, json=big_message(10), headers=CLIENT_HEADERS)
    assert r.status_code == 400
    assert mask_key(key) in r.json()["error"]["message"] and r.headers["x-echo-key"] == mask_key_ascii(key)
    assert key not in r.text and key not in str(r.headers)
    assert proxy.stop() == 0
    raw, flows = saved_flows(dump)
    assert flows and key.encode() not in raw
    # Decoded as mitmweb would show it, too (a gzipped body hides the key from a byte search).
    assert all(key not in (f.response.get_text(strict=False) or "") for f in flows if f.response)
    assert key not in proxy.output()
