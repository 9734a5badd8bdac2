"""Security requirements (issue 5): who gets keys, where they go, where they never show.

1. Host matching on the real destination (regular mode through a real mitmdump, plain
   HTTP and HTTPS-in-CONNECT; the loopback DNS shim gives every host its own fake).
2. Local clients only by default (in-process, mitmproxy.test.taddons).
3. The client token, end to end (file and environment variable).
4. No pool key in `-w` dumps, HAR exports, `flow_detail=4`/debug output or CLI output;
   the accounts file 0600 in a 0700 folder after every write.

Nothing leaves 127.0.0.1: upstreams are FakeKimi servers; 192.0.2.7 and 2001:db8::7
(documentation addresses) appear only as fake peer names in in-process flows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy import exceptions
from mitmproxy.addons import proxyauth
from mitmproxy.test import tflow, tutils

from rotator.core.keys import mask_key, mask_key_ascii
from rotator.proxy.addon import KimiRotator
from testbed.fake_kimi import FakeKimi
from testbed.hooks import call_hook
from tests.support.harness import counts_on_disk, poll, run_cli, sse_events
from tests.support.in_process import addon_in_taddons

PLACEHOLDER = "sk-kimi-placeholder-from-the-client"
TOKEN = "client-token-7f3a9c"
MESSAGES = "/coding/v1/messages"
LOOKALIKES = ("api.kimi.com.evil.test", "evilapi.kimi.com", "kimi.com", "api-kimi.com")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade"}


def message_body(stream: bool = False) -> bytes:
    return json.dumps({
        "model": "kimi-for-coding", "max_tokens": 16, "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
    }).encode()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # mitmdump children inherit os.environ: a developer's own settings must not leak in.
    monkeypatch.delenv("KIMI_ROTATOR_CLIENT_TOKEN", raising=False)
    monkeypatch.delenv("KIMI_ROTATOR_ACCOUNTS", raising=False)


@pytest.fixture
def more_fakes() -> Iterator[Callable[[], FakeKimi]]:
    """more_fakes() -> another running FakeKimi (one per look-alike host)."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(FakeKimi())


def dns_map(fakes: dict[str, FakeKimi]) -> str:
    return ",".join(f"{host}={fake.port}" for host, fake in fakes.items())


def secrets_of(keys: list[str]) -> list[str]:
    # What a mask hides (key[6:-4]): finding it anywhere means a key leaked, whole or not.
    return [key[6:-4] for key in keys]


def assert_no_pool_key(blob: bytes | str, keys: list[str], where: str) -> None:
    data = blob.encode("utf-8", "replace") if isinstance(blob, str) else blob
    for key, hidden in zip(keys, secrets_of(keys)):
        assert key.encode() not in data, f"{where} holds the full pool key {mask_key(key)}"
        assert hidden.encode() not in data, f"{where} holds part of pool key {mask_key(key)}"


def assert_no_pool_key_seen(fake: FakeKimi, keys: list[str], where: str) -> None:
    for seen in fake.requests:
        blob = repr(seen.raw_headers).encode() + seen.body
        assert_no_pool_key(blob, keys, f"{where}: {seen.method} {seen.path}")


def end_to_end_headers(raw: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Header lines in order, name case kept; hop-by-hop ones left out."""
    return [(k, v) for k, v in raw if k.lower() not in HOP_BY_HOP]


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def status_of(raw: bytes) -> int:
    return int(raw.split(b"\r\n", 1)[0].split(b" ", 2)[1])


def raw_request(method: str, target: str, host_header: str, body: bytes = b"",
                key: str = PLACEHOLDER) -> bytes:
    """An HTTP/1.1 request exactly as given (httpx would lower-case the host)."""
    return (
        f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\nx-api-key: {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    ).encode() + body


def send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def open_tunnel(port: int, target: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"proxy closed the CONNECT to {target}"
        head += chunk
    assert status_of(head) == 200, head
    return sock


# ------------------------------------------------------- 1. host matching, regular mode


def test_other_hosts_and_lookalikes_get_no_key_pass_unchanged_and_are_not_counted(
    fake_kimi: FakeKimi, keys: list[str], write_accounts, start_proxy, more_fakes, accounts_path
) -> None:
    """On the wire, through a real proxy: what tests/test_addon.py
    test_other_hosts_are_left_alone decides in-process for the same names."""
    write_accounts(keys, "round-robin")
    others = {host: more_fakes() for host in ("other.example", *LOOKALIKES)}
    proxy = start_proxy(fake_kimi, mode="regular", options={"loopback_dns_map": dns_map(others)})
    own = "sk-kimi-clientown" + "0" * 23
    own_bearer = "sk-kimi-clientbearer" + "1" * 20
    sends = [("other.example", {"x-api-key": own}),
             ("other.example", {"Authorization": f"Bearer {own_bearer}"}),
             # A name that merely looks like (or starts with) a Kimi host is another host.
             *((host, {"x-api-key": own}) for host in LOOKALIKES)]
    body = message_body()
    with httpx.Client(proxy=proxy.url, timeout=10, trust_env=False) as client:
        for host, auth in sends:
            fake = others[host]
            r = client.post(f"http://{host}{MESSAGES}?q=1", content=body, headers={
                **auth, "content-type": "application/json", "anthropic-version": "2023-06-01",
                "User-Agent": "claude-cli/2.0.14 (external, cli)", "X-Msh-Platform": "kimi_cli",
                "x-custom": "Keep Me",
            })
            assert r.status_code == 200, (host, r.text)
            seen = fake.requests[-1]
            assert r.headers.get("x-fake-kimi-request") == str(seen.number) == str(len(fake.requests))
            assert seen.key == (own_bearer if "Authorization" in auth else own), f"{host} got {seen.key!r}"
            assert (seen.method, seen.path, seen.body, seen.host) == ("POST", f"{MESSAGES}?q=1", body, host)
            sent = [(k.decode(), v.decode()) for k, v in r.request.headers.raw]
            assert end_to_end_headers(seen.raw_headers) == end_to_end_headers(sent), host
            assert sorted((k.lower(), v) for k, v in seen.raw_headers) == sorted(
                (k.lower(), v) for k, v in sent), host
            assert ("authorization" if "x-api-key" in auth else "x-api-key") not in seen.headers, host
        # Control: the real host, through the same proxy, does get a pool key; it comes
        # last, so once its success is saved anything counted for the others is too.
        r = client.post(f"http://api.kimi.com{MESSAGES}", content=body,
                        headers={"x-api-key": PLACEHOLDER, "content-type": "application/json"})
        assert r.status_code == 200, r.text
    assert [len(fake.requests) for fake in others.values()] == [2] + [1] * len(LOOKALIKES)
    assert fake_kimi.keys_seen() == [keys[0]]
    for host, fake in others.items():
        assert_no_pool_key_seen(fake, keys, host)
    assert poll(lambda: sum(ok for _, ok in counts_on_disk(accounts_path).values()) > 0, 5), proxy.output()
    assert counts_on_disk(accounts_path) == {keys[0]: (1, 1), keys[1]: (0, 0), keys[2]: (0, 0)}
    on_disk = accounts_path.read_text()
    assert own not in on_disk and own_bearer not in on_disk


def test_spoofed_host_header_gets_no_key_and_the_destination_decides(
    fake_kimi: FakeKimi, keys: list[str], write_accounts, start_proxy, more_fakes
) -> None:
    write_accounts(keys)
    other = more_fakes()
    proxy = start_proxy(fake_kimi, mode="regular", options={"loopback_dns_map": f"other.test={other.port}"})
    with httpx.Client(proxy=proxy.url, timeout=10, trust_env=False) as client:
        # Host header says Kimi, destination is other.test: no key.
        r = client.post(f"http://other.test{MESSAGES}", content=message_body(),
                        headers={"host": "api.kimi.com", "x-api-key": PLACEHOLDER})
        assert r.status_code == 200, r.text
        # The reverse: destination is Kimi, the header says something else: a key.
        r2 = client.post(f"http://api.kimi.com{MESSAGES}", content=message_body(),
                         headers={"host": "other.test", "x-api-key": PLACEHOLDER})
        assert r2.status_code == 200, r2.text
    assert [s.key for s in other.requests] == [PLACEHOLDER]
    assert other.requests[0].host == "api.kimi.com"  # the spoofed header arrived as sent
    assert_no_pool_key_seen(other, keys, "other.test")
    assert len(fake_kimi.requests) == 1 and fake_kimi.requests[0].key in keys


def test_exact_host_matching_ignores_case_and_trailing_dot(
    fake_kimi: FakeKimi, keys: list[str], write_accounts, start_proxy
) -> None:
    write_accounts(keys)
    proxy = start_proxy(fake_kimi, mode="regular")
    body = message_body()
    for host in ("API.KIMI.COM.", "Api.Kimi.Com"):
        raw = send_raw(proxy.port, raw_request("POST", f"http://{host}{MESSAGES}", host, body))
        assert status_of(raw) == 200, raw[:300]
    assert len(fake_kimi.requests) == 2
    assert all(seen.key in keys for seen in fake_kimi.requests), fake_kimi.keys_seen()


def test_https_connect_matches_the_tunnel_destination_not_host_or_sni(
    fake_kimi: FakeKimi, keys: list[str], write_accounts, start_proxy, more_fakes
) -> None:
    """Inside a CONNECT tunnel mitmproxy takes request.host from the CONNECT target (where
    it connects), so neither the Host header nor the TLS SNI can pull a key to another host."""
    write_accounts(keys)
    other = more_fakes()
    proxy = start_proxy(fake_kimi, mode="regular", options={"loopback_dns_map": f"other.test={other.port}"})
    tls = ssl.create_default_context(cafile=str(proxy.ca_cert))
    with httpx.Client(proxy=proxy.url, verify=tls, timeout=10, trust_env=False) as client:
        r = client.post(f"https://api.kimi.com{MESSAGES}", content=message_body(),
                        headers={"x-api-key": PLACEHOLDER})
        assert r.status_code == 200, r.text
        r = client.post(f"https://other.test{MESSAGES}", content=message_body(),
                        headers={"host": "api.kimi.com", "x-api-key": PLACEHOLDER})
        assert r.status_code == 200, r.text
    # CONNECT other.test, but TLS SNI and Host both say api.kimi.com.
    sock = open_tunnel(proxy.port, "other.test:443")
    with tls.wrap_socket(sock, server_hostname="api.kimi.com") as tunnel:
        tunnel.sendall(raw_request("POST", MESSAGES, "api.kimi.com", message_body()))
        raw = read_until_closed(tunnel)
    assert status_of(raw) == 200, raw[:300]
    assert len(fake_kimi.requests) == 1 and fake_kimi.requests[0].key in keys
    assert [s.key for s in other.requests] == [PLACEHOLDER, PLACEHOLDER]
    assert_no_pool_key_seen(other, keys, "other.test")


# ------------------------------------------------- 2. local clients only (in-process)


def kimi_flow(peer: tuple[Any, ...], key: str | None = PLACEHOLDER, host: str = "api.kimi.com"):
    flow = tflow.tflow()
    flow.request.scheme = "https"
    flow.request.host = host
    flow.request.port = 443
    flow.request.path = MESSAGES
    if key is not None:
        flow.request.headers["x-api-key"] = key
    flow.client_conn.peername = peer
    return flow


@pytest.fixture
async def addon_ctx(keys: list[str], write_accounts) -> AsyncIterator[tuple[KimiRotator, Any]]:
    with addon_in_taddons(write_accounts(keys), proxyauth.ProxyAuth(), kimi_hosts=["api.kimi.com"]) as (addon, tctx):
        yield addon, tctx


def assert_anthropic_error(flow: Any, status: int, error_type: str) -> dict[str, Any]:
    assert flow.response is not None, "the addon let the request through"
    assert flow.response.status_code == status
    assert flow.response.headers["content-type"].startswith("application/json")
    body = json.loads(flow.response.content)
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert body["error"]["message"]
    return body


REMOTE_PEERS = [("192.0.2.7", 5555), ("::ffff:192.0.2.7", 5555, 0, 0), ("2001:db8::7", 5555, 0, 0)]
LOCAL_PEERS = [("127.0.0.1", 5555), ("127.8.9.10", 5555), ("::1", 5555, 0, 0),
               ("::ffff:127.0.0.1", 5555, 0, 0)]


@pytest.mark.parametrize("peer", REMOTE_PEERS, ids=lambda p: p[0])
async def test_remote_client_gets_403_and_no_key(addon_ctx, keys: list[str], peer) -> None:
    addon, _ = addon_ctx
    flow = kimi_flow(peer)
    await call_hook(addon, "request", flow)
    body = assert_anthropic_error(flow, 403, "permission_error")
    assert "kimi_allow_remote" in body["error"]["message"]
    assert flow.request.headers["x-api-key"] == PLACEHOLDER
    assert_no_pool_key(bytes(flow.request.headers), keys, "refused request")


@pytest.mark.parametrize("peer", LOCAL_PEERS, ids=lambda p: p[0])
async def test_loopback_clients_are_served_and_the_sent_key_is_masked(addon_ctx, keys, peer) -> None:
    addon, _ = addon_ctx
    flow = kimi_flow(peer)
    await call_hook(addon, "request", flow)
    assert flow.response is None
    sent = flow.request.headers["x-api-key"]
    assert sent in keys
    # After the answer arrives, mitmproxy's copy of the request holds only the mask.
    flow.response = tutils.tresp()
    await call_hook(addon, "responseheaders", flow)
    await call_hook(addon, "response", flow)
    assert flow.request.headers["x-api-key"] == mask_key_ascii(sent)
    assert_no_pool_key(bytes(flow.request.headers) + json.dumps(flow.get_state(), default=repr).encode(),
                       keys, "answered flow")


async def test_remote_client_to_other_host_is_left_alone(addon_ctx) -> None:
    addon, _ = addon_ctx
    flow = kimi_flow(REMOTE_PEERS[0], host="example.test")
    before = flow.request.get_state()
    await call_hook(addon, "request", flow)
    assert flow.response is None and flow.request.get_state() == before


async def test_allow_remote_needs_proxyauth_or_token(addon_ctx) -> None:
    addon, tctx = addon_ctx
    with pytest.raises(exceptions.OptionsError, match="proxyauth or a client token"):
        tctx.configure(addon, kimi_allow_remote=True)
    tctx.configure(addon, proxyauth="user:secret", kimi_allow_remote=True)  # accepted


async def test_allow_remote_with_token_serves_remote_clients(addon_ctx, keys, tmp_path: Path) -> None:
    addon, tctx = addon_ctx
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    tctx.configure(addon, kimi_client_token_file=str(token_file), kimi_allow_remote=True)
    flow = kimi_flow(REMOTE_PEERS[0], key=TOKEN)
    await call_hook(addon, "request", flow)
    assert flow.response is None
    assert flow.request.headers["x-api-key"] in keys
    wrong = kimi_flow(REMOTE_PEERS[0], key="not-the-token")
    await call_hook(addon, "request", wrong)
    assert_anthropic_error(wrong, 401, "authentication_error")
    assert wrong.request.headers["x-api-key"] == "not-the-token"


class FakeProxyServer:
    """Stands in for mitmproxy's proxyserver addon: only listen_addrs() is used."""

    name = "proxyserver"

    def __init__(self, addresses: list[tuple[Any, ...]]) -> None:
        self.addresses = addresses

    def listen_addrs(self) -> list[tuple[Any, ...]]:
        return self.addresses


@pytest.mark.slow
@pytest.mark.parametrize("addresses, exposed", [
    ([("0.0.0.0", 8080)], "0.0.0.0:8080"),
    ([("::", 8080, 0, 0)], ":::8080"),
    ([("127.0.0.1", 8080), ("192.168.1.20", 8080)], "192.168.1.20:8080"),
    ([("127.0.0.1", 8080), ("::1", 8080, 0, 0)], None),
], ids=["ipv4-any", "ipv6-any", "lan", "loopback-only"])
async def test_startup_warns_when_listening_beyond_loopback(
    keys, write_accounts, caplog: pytest.LogCaptureFixture, addresses, exposed
) -> None:
    """Nothing is bound: the proxyserver addon is a fake that reports these addresses."""
    with addon_in_taddons(write_accounts(keys), FakeProxyServer(addresses), proxyauth.ProxyAuth()) as (addon, _):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            await call_hook(addon, "running", None)
        await call_hook(addon, "done", None)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "listening" in r.getMessage()]
    if exposed is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and exposed in warnings[0], warnings
        assert "127.0.0.1" in warnings[0]  # tells how to stay local


# ------------------------------------------------------ 3. client token, end to end


@pytest.mark.parametrize("source", ["file", "env"])
def test_client_token_end_to_end(
    fake_kimi: FakeKimi, keys, write_accounts, start_proxy, tmp_path: Path, source: str
) -> None:
    write_accounts(keys)
    if source == "file":
        token_file = tmp_path / "client-token"
        token_file.write_text(TOKEN + "\n")
        proxy = start_proxy(fake_kimi, options={"kimi_client_token_file": str(token_file)})
    else:
        proxy = start_proxy(fake_kimi, env={"KIMI_ROTATOR_CLIENT_TOKEN": TOKEN})
    url = proxy.url + MESSAGES
    with httpx.Client(timeout=10, trust_env=False) as client:
        for headers in ({"x-api-key": "wrong-token"}, {"authorization": "Bearer wrong-token"},
                        {}, {"x-api-key": ""}, {"authorization": f"Basic {TOKEN}"}):
            r = client.post(url, content=message_body(), headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["type"] == "error"
            assert r.json()["error"]["type"] == "authentication_error"
        assert fake_kimi.requests == [], "a request without the token reached upstream"
        ok = client.post(url, content=message_body(), headers={"x-api-key": TOKEN})
        ok_bearer = client.post(url, content=message_body(), headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok_bearer.status_code == 200, (ok.text, ok_bearer.text)
    assert len(fake_kimi.requests) == 2
    for seen in fake_kimi.requests:
        assert seen.key in keys
        assert TOKEN not in repr(seen.raw_headers), "the client token went upstream"
    assert_no_pool_key(proxy.output(), keys, "mitmdump output")


# ------------------------------------------------------------- 4. no key at rest or in output


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_pool_key_in_flow_dump_har_or_console(
    fake_kimi: FakeKimi, keys, write_accounts, start_proxy, tmp_path: Path
) -> None:
    write_accounts(keys)
    fake_kimi.set_response(keys[0], 429, {"type": "error", "error": {
        "type": "rate_limit_error", "message": "too many requests"}}, {"retry-after": "30"}, times=1)
    dump, har = tmp_path / "flows.mitm", tmp_path / "flows.har"
    proxy = start_proxy(
        fake_kimi, mode="regular",
        options={"flow_detail": 4, "hardump": str(har), "termlog_verbosity": "debug",
                 "kimi_hosts": "api.kimi.com", "loopback_dns_map": f"dead.kimi.test={closed_port()}"},
        extra_args=("--set", "kimi_hosts=dead.kimi.test", "-w", str(dump)),
    )
    base = "http://api.kimi.com"
    statuses = []
    with httpx.Client(proxy=proxy.url, timeout=10, trust_env=False) as client:
        for i in range(4):  # JSON; one of these meets the scripted 429
            auth = {"x-api-key": PLACEHOLDER} if i % 2 else {"authorization": f"Bearer {PLACEHOLDER}"}
            statuses.append(client.post(base + MESSAGES, content=message_body(), headers=auth).status_code)
        with client.stream("POST", base + MESSAGES, content=message_body(stream=True),
                           headers={"x-api-key": PLACEHOLDER}) as sse:
            assert sse.headers["content-type"].startswith("text/event-stream")
            assert [name for name, _ in sse_events(sse.read())][-1] == "message_stop"
        statuses.append(client.get(base + "/coding/v1/models", headers={"x-api-key": PLACEHOLDER}).status_code)
        # A Kimi host whose upstream refuses the connection: the error hook path.
        dead = client.post(f"http://dead.kimi.test{MESSAGES}", content=message_body(),
                           headers={"x-api-key": PLACEHOLDER})
    assert dead.status_code >= 500
    assert 200 in statuses and fake_kimi.requests[0].status == 429, statuses
    used = sorted(set(fake_kimi.keys_seen()))
    assert used and set(used) <= set(keys)
    assert proxy.stop() == 0
    out = proxy.output()
    dump_bytes, har_text = dump.read_bytes(), har.read_text(encoding="utf-8")
    for where, blob in (("-w dump", dump_bytes), ("HAR", har_text), ("mitmdump output", out)):
        assert_no_pool_key(blob, keys, where)
    # The scan would have seen a key: the masked form is where the key was.
    har_headers = json.dumps([e["request"]["headers"] for e in json.loads(har_text)["log"]["entries"]],
                             ensure_ascii=False)
    assert "x-api-key" in out.lower() and "authorization" in out.lower()  # flow_detail=4 headers
    # The client's retried flow shows the key that answered; the refused attempt's key
    # is in its metadata (the dump), not in any HAR request.
    refused = fake_kimi.requests[0].key
    for key in used:
        masked, in_headers = mask_key(key), mask_key_ascii(key)
        assert masked.encode() in dump_bytes, f"{masked} not in the dump"
        if key != refused:
            assert in_headers in har_headers, f"{in_headers} not in the HAR request headers"
        # Headers hold the ASCII form: mitmdump's console prints their bytes raw, and
        # would show "…" as \xe2\x80\xa6 (issue 27).
        # The refused key is in the log's line about it; the others in the printed headers.
        assert (masked if key == refused else in_headers) in out, f"{masked} not in the console output"
    assert "\\xe2\\x80\\xa6" not in out


def test_no_pool_key_in_dump_of_flow_in_flight_at_shutdown(
    fake_kimi: FakeKimi, keys, write_accounts, start_proxy, tmp_path: Path
) -> None:
    write_accounts(keys)
    fake_kimi.set_default(delay=3.0)
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, extra_args=("-w", str(dump)))

    def client() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(proxy.url + MESSAGES, content=message_body(),
                       headers={"x-api-key": PLACEHOLDER}, timeout=10, trust_env=False)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    assert poll(lambda: fake_kimi.requests, 5, interval=0.01)  # in flight now: the fake holds it 3 s
    assert fake_kimi.requests[0].key in keys
    proxy.stop()
    thread.join(10)
    assert dump.exists() and dump.stat().st_size > 0, "the in-flight flow was not saved at all"
    assert_no_pool_key(dump.read_bytes(), keys, "-w dump of a flow in flight at shutdown")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private(path: Path, when: str) -> None:
    assert mode_of(path) == 0o600, f"{when}: {path.name} is {oct(mode_of(path))}"
    assert mode_of(path.parent) == 0o700, f"{when}: folder is {oct(mode_of(path.parent))}"
    for other in path.parent.iterdir():  # no stray temp copy readable by others
        if other.name.startswith(f".{path.name}."):
            assert mode_of(other) & 0o077 == 0, f"{when}: {other.name} is {oct(mode_of(other))}"


def test_accounts_file_stays_0600_after_the_proxy_writes(
    fake_kimi: FakeKimi, keys, write_accounts, start_proxy
) -> None:
    path = write_accounts(keys)
    assert_private(path, "after write_accounts")
    path.chmod(0o644)  # e.g. a file the TypeScript plugin wrote: the proxy's write fixes it
    proxy = start_proxy(fake_kimi)
    r = httpx.post(proxy.url + MESSAGES, content=message_body(), headers={"x-api-key": PLACEHOLDER},
                   timeout=10, trust_env=False)
    assert r.status_code == 200
    assert poll(lambda: any(total for total, _ in counts_on_disk(path).values()), 5), (
        "the proxy did not flush its counts within 5 s")
    assert_private(path, "after the proxy's flush")
    assert proxy.stop() == 0
    assert_private(path, "after the proxy's final save")
    assert_no_pool_key(proxy.output(), keys, "mitmdump output")


@pytest.mark.slow
def test_cli_output_never_holds_a_key_and_the_file_stays_private(keys, tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "kimi-rotator" / "kimi-accounts.json"
    first, second, third = keys
    steps: list[tuple[tuple[str, ...], str | None, int, list[str]]] = [
        # (args, stdin, exit code, masked keys that must show)
        (("add-key", first, "Personal"), None, 0, [first]),
        (("add-key", "-", "Work"), second + "\n", 0, [second]),
        (("add-key", third), None, 0, [third]),
        (("add-key", first, "Again"), None, 2, [first]),  # duplicate: refused, masked
        (("list-keys",), None, 0, keys),
        (("list-keys", "--json"), None, 0, keys),
        (("use-key", "1"), None, 0, [second]),
        (("rotate",), None, 0, [third]),
        (("set-strategy", "sticky"), None, 0, []),
        (("remove-key", "0"), None, 0, [first]),
        (("list-keys", "--json"), None, 0, [second, third]),
    ]
    for args, stdin, code, shown in steps:
        result = run_cli(path, *args, stdin=stdin)
        output = result.stdout + result.stderr
        assert result.returncode == code, (args, output)
        assert_no_pool_key(output, keys, f"`{' '.join(a if a not in keys else mask_key(a) for a in args)}`")
        if "--json" in args:  # JSON escapes the ellipsis: compare the parsed masks
            listed = json.loads(result.stdout)["accounts"]
            assert [a["maskedKey"] for a in listed] == [mask_key(k) for k in shown]
        else:
            for key in shown:
                assert mask_key(key) in output, (args, output)
        assert_private(path, f"after {args[0]}")
        if args == ("add-key", first, "Personal"):
            path.chmod(0o644)  # e.g. written by another tool: the next write tightens it
            assert run_cli(path, "set-strategy", "round-robin").returncode == 0
            assert_private(path, "after a CLI write to a 0644 file")
    assert set(a["key"] for a in json.loads(path.read_text())["accounts"]) == {second, third}

