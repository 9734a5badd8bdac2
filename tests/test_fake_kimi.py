"""Tests of the test tools themselves: fake_kimi, loopback_dns and harness."""

from __future__ import annotations

import datetime as dt
import signal
import ssl
import threading
import time

import httpx
import pytest

from testbed.fake_kimi import (
    KIMI_ERRORS,
    MESSAGES_PATH,
    FakeKimi,
    kimi_error,
    mid_stream_error_events,
)
from testbed.processes import start_fake_kimi_process, start_mitmdump
from tests.support.harness import LOOPBACK_DNS, poll, sse_events

MSG = {"model": "kimi-for-coding", "max_tokens": 16,
       "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def kimi():
    with FakeKimi(gate_timeout=5) as k:
        yield k


@pytest.fixture
def client():
    # trust_env=False: never pick up a proxy from the environment.
    with httpx.Client(timeout=10, trust_env=False) as c:
        yield c


def post(client: httpx.Client, url: str, key: str | None = "sk-kimi-a", *,
         bearer: bool = False, body: dict = MSG, **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if key is not None:
        headers["Authorization" if bearer else "x-api-key"] = (
            f"Bearer {key}" if bearer else key)
    return client.post(url + MESSAGES_PATH, json=body, headers=headers, **kw)


# --------------------------------------------------------------------------
# fake server
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_json_success_and_request_log(kimi, client):
    r1 = post(client, kimi.url, "sk-kimi-a", headers={"User-Agent": "claude-cli/2.0",
                                                      "X-Msh-Platform": "test"})
    r2 = post(client, kimi.url, "sk-kimi-b", bearer=True)
    assert r1.status_code == 200 and r2.status_code == 200
    assert r1.headers["content-type"] == "application/json"
    body = r1.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == "kimi-for-coding" and body["stop_reason"] == "end_turn"
    assert body["content"] == [{"type": "text", "text": "hello from fake kimi #1"}]
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] > 0
    assert r2.json()["content"][0]["text"] == "hello from fake kimi #2"

    assert kimi.keys_seen() == ["sk-kimi-a", "sk-kimi-b"]
    assert kimi.count_by_key() == {"sk-kimi-a": 1, "sk-kimi-b": 1}
    seen = kimi.requests[0]
    assert (seen.method, seen.path, seen.status, seen.number) == ("POST", MESSAGES_PATH,
                                                                  200, 1)
    assert seen.json == MSG and not seen.stream
    assert seen.headers["user-agent"] == "claude-cli/2.0"
    assert "X-Msh-Platform" in seen.header_names()  # original case kept
    assert seen.host == f"127.0.0.1:{kimi.port}"


@pytest.mark.slow
def test_no_key_unknown_path_bad_body(kimi, client):
    r = post(client, kimi.url, None)
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {
        "type": "invalid_authentication_error", "message": "Invalid Authentication"}}
    r = client.get(kimi.url + "/v1/nothing", headers={"x-api-key": "k"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.post(kimi.url + MESSAGES_PATH, content=b"not json",
                    headers={"x-api-key": "k"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # any Host header is fine
    r = client.get(kimi.url + "/coding/v1/models",
                   headers={"x-api-key": "k", "Host": "api.kimi.com"})
    assert r.status_code == 200 and kimi.requests[-1].host == "api.kimi.com"


@pytest.mark.slow
def test_sse_events_arrive_one_by_one(kimi, client):
    gate = kimi.hold_stream_after_first_event(key="sk-kimi-s")
    arrivals: list[tuple[float, str]] = []
    got_first = threading.Event()
    meta: dict = {}

    def reader() -> None:
        with client.stream("POST", kimi.url + MESSAGES_PATH, json={**MSG, "stream": True},
                           headers={"x-api-key": "sk-kimi-s"}) as r:
            meta.update(status=r.status_code, headers=r.headers)
            for line in r.iter_lines():
                arrivals.append((time.monotonic(), line))
                if line.startswith("data: "):
                    got_first.set()

    t = threading.Thread(target=reader)
    t.start()
    try:
        # The first event reaches the client while the server is parked at the gate.
        assert got_first.wait(3), "first SSE event did not arrive before release"
        assert gate.wait_reached(2) and not gate.timed_out
        time.sleep(0.2)  # anything not held back would arrive now
        assert not kimi.wait_for_requests(1, timeout=0.01)  # still streaming
        released = time.monotonic()
    finally:
        gate.set()
        t.join(5)
    assert meta["status"] == 200
    assert meta["headers"]["content-type"].startswith("text/event-stream")
    assert "content-length" not in meta["headers"]
    before = [line for ts, line in arrivals if ts < released]
    after = [line for ts, line in arrivals if ts >= released]
    # exactly the first event (its "event:", "data:" and blank line) came early
    assert [line.split(":")[0] for line in before] == ["event", "data", ""]
    assert before[0] == "event: message_start"
    events = sse_events(line for _, line in arrivals)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and events[0][1]["message"]["content"] == []
    assert sse_events(after)[0][0] == "content_block_start"
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert len(deltas) >= 3
    assert "".join(d["delta"]["text"] for d in deltas) == "hello from fake kimi #1"
    assert kimi.wait_for_requests(1) and not gate.timed_out
    assert kimi.requests[0].stream and gate.claimed_by == 1


@pytest.mark.slow
def test_sse_close_framing_and_mid_stream_error(client):
    with FakeKimi(stream_framing="close", event_delay=0.001) as k:
        with client.stream("POST", k.url + MESSAGES_PATH, json={**MSG, "stream": True},
                           headers={"x-api-key": "a"}) as r:
            assert r.headers.get("connection") == "close"
            assert "transfer-encoding" not in r.headers
            names = [n for n, _ in sse_events(r.iter_lines())]
        assert names[0] == "message_start" and names[-1] == "message_stop"
        k.set_response("a", 200, sse_events=mid_stream_error_events(), times=1)
        r = post(client, k.url, "a", body={**MSG, "stream": True})
        events = sse_events(r.text.splitlines())
        assert r.status_code == 200
        assert [n for n, _ in events][:3] == ["message_start", "content_block_start",
                                              "content_block_delta"]
        assert events[-1] == ("error", {"type": "error", "error": {
            "type": "overloaded_error", "message": KIMI_ERRORS["overloaded"][2]}})


@pytest.mark.slow
def test_scripted_errors_with_times(kimi, client):
    kimi.set_kimi_error("sk-kimi-a", "overloaded", times=2)
    kimi.add_response("sk-kimi-a", 403, {"type": "error", "error": {
        "type": "permission_error", "message": "custom"}}, {"x-extra": "1"}, times=1)
    kimi.set_response("sk-kimi-b", 500, "plain text", times=None)
    statuses = [post(client, kimi.url, "sk-kimi-a").status_code for _ in range(4)]
    assert statuses == [429, 429, 403, 200]
    r = post(client, kimi.url, "sk-kimi-a", bearer=True)
    assert r.status_code == 200
    first = kimi.requests[0]
    assert first.status == 429
    r = post(client, kimi.url, "sk-kimi-a")
    assert r.status_code == 200
    for _ in range(3):  # times=None: forever
        r = post(client, kimi.url, "sk-kimi-b")
        assert r.status_code == 500 and r.text == "plain text"
    assert post(client, kimi.url, "sk-kimi-c").status_code == 200
    # scripts apply to /messages only by default
    assert client.get(kimi.url + "/coding/v1/models",
                      headers={"x-api-key": "sk-kimi-b"}).status_code == 200
    assert kimi.count_by_key() == {"sk-kimi-a": 6, "sk-kimi-b": 4, "sk-kimi-c": 1}
    # the body of an overloaded answer is Kimi's
    kimi.set_kimi_error("sk-kimi-d", "client_identity")
    r = post(client, kimi.url, "sk-kimi-d")
    assert r.status_code == 403
    assert "only available for Coding Agents" in r.json()["error"]["message"]
    # default answer for unscripted keys
    kimi.set_default(503, {"type": "error", "error": {"type": "api_error",
                                                      "message": "down"}})
    assert post(client, kimi.url, "sk-kimi-z").status_code == 503
    kimi.set_default()
    assert post(client, kimi.url, "sk-kimi-z").status_code == 200


@pytest.mark.slow
def test_a_hang_ends_when_the_client_closes_its_connection(kimi, client):
    kimi.set_response("sk-kimi-a", delay=20, until_closed=True, times=1)
    with pytest.raises(httpx.ReadTimeout):
        post(client, kimi.url, timeout=0.3)  # httpx closes the connection on a timeout
    assert poll(lambda: kimi.requests[0].closed is not None, 5), kimi.requests
    first = kimi.requests[0]
    assert first.closed - first.monotonic < 2 and first.status is None  # seen at once, nothing answered
    assert kimi.in_flight_by_key() == {}
    kimi.set_response("sk-kimi-a", delay=0.2, until_closed=True, times=1)
    r = post(client, kimi.url)  # a client that waits gets the answer after the delay
    assert r.status_code == 200 and kimi.requests[1].closed is None


def test_error_catalogue():
    want = {"overloaded": 429, "five_hour": 403, "weekly": 403, "billing_cycle": 403,
            "concurrency": 403, "membership": 402, "client_identity": 403,
            "banned": 403, "invalid_auth": 401, "server_error": 500,
            "unavailable": 503, "overloaded_529": 529}
    for name, status in want.items():
        st, body = kimi_error(name)
        assert st == status and body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
    substrings = {
        "overloaded": "The engine is currently overloaded",
        "five_hour": "You've reached your 5-hour usage limit",
        "weekly": "You've reached your weekly (7-day) usage limit",
        "billing_cycle": "usage limit for this billing cycle",
        "concurrency": "concurrent request limit",
        "membership": "unable to verify your membership benefits",
        "client_identity": "only available for Coding Agents",
        "banned": "Access terminated. Review our Community Guidelines",
        "invalid_auth": "Invalid Authentication",
    }
    for name, text in substrings.items():
        assert text in kimi_error(name)[1]["error"]["message"]
    status, bare = kimi_error("weekly", envelope="bare")
    assert status == 403 and set(bare) == {"error"}


@pytest.mark.slow
def test_usages_and_models(kimi, client):
    reset = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    kimi.set_usage("sk-kimi-a", five_hour_reset=reset, weekly_reset="2030-01-09T00:00:00Z",
                   five_hour_limit=10)
    post(client, kimi.url, "sk-kimi-a")
    r = client.get(kimi.url + "/coding/v1/usages",
                   headers={"Authorization": "Bearer sk-kimi-a"})
    assert r.status_code == 200
    u = r.json()
    assert u["usage"]["resetTime"] == "2030-01-09T00:00:00Z"
    (lim,) = u["limits"]
    assert lim["window"] == {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"}
    assert lim["detail"] == {"limit": "10", "used": "1", "remaining": "9",
                             "resetTime": "2030-01-02T03:04:05Z"}
    assert u["parallel"]["limit"] == "30"
    # default reset times are RFC 3339, in the future
    other = client.get(kimi.url + "/coding/v1/usages",
                       headers={"x-api-key": "sk-kimi-b"}).json()
    t = dt.datetime.fromisoformat(other["limits"][0]["detail"]["resetTime"]
                                  .replace("Z", "+00:00"))
    assert dt.timedelta(hours=4) < t - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(hours=5)
    # usages can be scripted too
    kimi.set_kimi_error("sk-kimi-c", "invalid_auth", path="/coding/v1/usages")
    assert client.get(kimi.url + "/coding/v1/usages",
                      headers={"x-api-key": "sk-kimi-c"}).status_code == 401
    models = client.get(kimi.url + "/coding/v1/models", headers={"x-api-key": "k"}).json()
    assert "kimi-for-coding" in [m["id"] for m in models["data"]]


@pytest.mark.slow
def test_in_flight_tracking_and_stop(client):
    k = FakeKimi().start()
    k.set_response("a", delay=0.3)
    threads = [threading.Thread(target=post, args=(client, k.url, "a")) for _ in range(3)]
    for t in threads:
        t.start()
    assert poll(lambda: k.in_flight_by_key() == {"a": 3}, 1.0), k.in_flight_by_key()  # each held 0.3 s
    for t in threads:
        t.join()
    # A handler counts its request done once it has written the answer, which may be a
    # moment after the client read it: wait for that, not for the client.
    assert poll(lambda: k.in_flight_by_key() == {}, 2.0), k.in_flight_by_key()
    assert k.max_in_flight_by_key() == {"a": 3}
    url = k.url
    k.stop()
    with pytest.raises(httpx.TransportError):
        post(client, url, "a")  # the keep-alive connection was closed too


@pytest.mark.slow
def test_cli_process():
    proc, port = start_fake_kimi_process()
    try:
        with httpx.Client(trust_env=False, timeout=5) as c:
            r = post(c, f"http://127.0.0.1:{port}", "x")
        assert r.status_code == 200 and "fake kimi #1" in r.text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0


# --------------------------------------------------------------------------
# mitmdump harness + loopback_dns
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_mitmdump_reverse_regular_and_https(kimi, tmp_path):
    headers = {"x-api-key": "sk-kimi-rev", "User-Agent": "claude-cli/2.0 (external, cli)",
               "X-Msh-Platform": "kimi_cli"}
    rev = start_mitmdump(addons=[LOOPBACK_DNS], mode=f"reverse:{kimi.url}",
                         confdir=tmp_path / "mitm")
    reg = start_mitmdump(addons=[LOOPBACK_DNS], confdir=tmp_path / "mitm",
                         options={"loopback_dns_port": kimi.port})
    try:
        # reverse mode: straight to the proxy
        with httpx.Client(trust_env=False, timeout=10) as c:
            r = c.post(rev.url + MESSAGES_PATH, json=MSG, headers=headers)
        assert r.status_code == 200, rev.output()
        seen = kimi.requests[-1]
        assert seen.key == "sk-kimi-rev" and seen.json == MSG
        assert seen.headers["user-agent"] == headers["User-Agent"]
        assert "X-Msh-Platform" in seen.header_names()
        # mitmproxy rewrites Host to the reverse target unless keep_host_header
        assert seen.host == f"127.0.0.1:{kimi.port}"
        assert "reverse proxy to" in rev.output()

        # regular mode, plain HTTP, names redirected by loopback_dns
        headers["x-api-key"] = "sk-kimi-reg"
        with httpx.Client(proxy=reg.url, trust_env=False, timeout=10) as c:
            r = c.post("http://api.kimi.com/coding/v1/messages", json=MSG, headers=headers)
            r2 = c.get("http://api.kimi.com.evil.test:8080/coding/v1/models",
                       headers=headers)
        assert r.status_code == 200, reg.output()
        assert r.json()["content"][0]["text"].startswith("hello from fake kimi")
        seen = kimi.requests[-2]
        assert (seen.key, seen.path, seen.host) == ("sk-kimi-reg", MESSAGES_PATH,
                                                    "api.kimi.com")
        assert seen.headers["user-agent"] == headers["User-Agent"]
        assert seen.headers["x-msh-platform"] == "kimi_cli"
        assert r2.status_code == 200
        assert kimi.requests[-1].host == "api.kimi.com.evil.test:8080"

        # regular mode, HTTPS through CONNECT, trusting this run's CA
        ctx = ssl.create_default_context(cafile=str(reg.ca_cert))
        with httpx.Client(proxy=reg.url, verify=ctx, trust_env=False, timeout=10) as c:
            r = c.post("https://api.kimi.com/coding/v1/messages", json=MSG,
                       headers={**headers, "x-api-key": "sk-kimi-tls"})
        assert r.status_code == 200, reg.output()
        assert kimi.requests[-1].key == "sk-kimi-tls"
        assert kimi.requests[-1].host == "api.kimi.com"
    finally:
        assert rev.stop() == 0
        assert reg.stop() == 0
    assert "HTTP(S) proxy listening at 127.0.0.1:" in reg.output()
    assert "api.kimi.com" not in rev.output()


@pytest.mark.slow
def test_loopback_dns_refuses_unmapped_hosts(kimi, tmp_path):
    with start_mitmdump(addons=[LOOPBACK_DNS], confdir=tmp_path / "mitm",
                        options={"loopback_dns_map": f"api.kimi.com={kimi.port}"}) as p:
        with httpx.Client(proxy=p.url, trust_env=False, timeout=10) as c:
            ok = c.get("http://api.kimi.com/coding/v1/models", headers={"x-api-key": "k"})
            bad = c.get("http://example.com/", headers={"x-api-key": "k"})
        assert ok.status_code == 200
        assert bad.status_code == 502 and "refusing to leave loopback" in bad.text
        assert len(kimi.requests) == 1
        assert p.wait_for_output("refusing to leave loopback for example.com", 5)


@pytest.mark.parametrize("options, match", [
    ({"no_such_option": "1"}, "unknown option.*no_such_option"),  # mitmdump: silent
    ({"loopback_dns_map": "nonsense"}, "Error logged during startup"),  # after 'listening'
    ({"loopback_dns_port": "abc"}, "did not finish starting"),  # mitmdump: silent
])
@pytest.mark.slow
def test_harness_reports_startup_failure(tmp_path, options, match):
    with pytest.raises(RuntimeError, match=match):
        start_mitmdump(addons=[LOOPBACK_DNS], confdir=tmp_path / "mitm",
                       options=options, timeout=10, ready_timeout=1.5)
