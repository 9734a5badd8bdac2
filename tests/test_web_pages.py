"""No web page can spend the pool (issue 23, defect 4): DNS rebinding and cross-site pages.

A page the user opens can send requests to the proxy's port: one whose own name was made
to resolve to 127.0.0.1 (DNS rebinding) addresses it by that name (`Host`), one on another
site carries its `Origin` (or `Sec-Fetch-Site: cross-site`), and a `text/plain` POST needs
no CORS preflight. Such requests get a 403 in the client's error shape, no key, nothing
upstream, nothing counted. Loopback origins (a local web UI) and requests with no Origin
(curl-like CLI agents) keep working; the client token lets a client past both checks.

1. The decision, a table of cases (rotator.core.access.check_page).
2. The hook in-process: the reverse-mode Host kept from mitmproxy's rewrite, read and put back.
3. Real mitmdump in reverse and regular mode, raw HTTP on the wire (HTTP/1.1 and HTTP/2),
   in front of testbed/fake_kimi.py: what the client gets, what Kimi saw, what was counted.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from mitmproxy.addons import proxyauth
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow

from rotator.core import access
from rotator.proxy.addon import KimiRotator
from rotator.proxy.client_host import NOTHING_SEEN, ClientHost
from testbed.fake_kimi import CHAT_COMPLETIONS_PATH, MESSAGES_PATH, FakeKimi
from testbed.hooks import call_hook
from testbed.processes import start_mitmdump
from tests.support.harness import ADDON_SCRIPT
from tests.support.harness import counts_on_disk, saved_flows
from tests.support.in_process import addon_in_taddons

PLACEHOLDER = "sk-kimi-placeholder"
TOKEN = "client-token-5e1d7a"
EVIL = "https://evil.example"
BODY = json.dumps({"model": "kimi-for-coding", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # mitmdump children inherit os.environ: a developer's own token must not leak in.
    monkeypatch.delenv("KIMI_ROTATOR_CLIENT_TOKEN", raising=False)


# --------------------------------------------------------------- 1. the decision, a table

HOST = access.FOREIGN_HOST
PAGE = access.FOREIGN_PAGE
OWN = frozenset({"api.kimi.com"})

# (what, reverse mode, names addressed, Origin, Sec-Fetch-Site, allow_remote, token presented, denial)
CASES: list[tuple[str, bool, tuple[str, ...], str | None, str | None, bool, bool, access.Denial | None]] = [
    # Reverse mode: the name the client addressed.
    ("loopback IPv4", True, ("127.0.0.1:8080",), None, None, False, False, None),
    ("anywhere in 127/8", True, ("127.5.6.7",), None, None, False, False, None),
    ("localhost", True, ("localhost:8080",), None, None, False, False, None),
    ("LOCALHOST. (case, trailing dot)", True, ("LOCALHOST.:8080",), None, None, False, False, None),
    ("a name under .localhost", True, ("app.localhost:8080",), None, None, False, False, None),
    ("IPv6 loopback", True, ("[::1]:8080",), None, None, False, False, None),
    ("IPv4-mapped loopback", True, ("[::ffff:127.0.0.1]:8080",), None, None, False, False, None),
    ("the unspecified address", True, ("0.0.0.0:8080",), None, None, False, False, None),
    ("a Kimi host (hosts-file setups)", True, ("api.kimi.com",), None, None, False, False, None),
    ("no Host at all", True, (), None, None, False, False, None),
    ("a rebinding name", True, ("attacker.example:8080",), None, None, False, False, HOST),
    ("a rebinding name, same-origin POST", True, ("attacker.example:8080",), "http://attacker.example:8080",
     "same-origin", False, False, HOST),
    ("a name that starts like loopback", True, ("127.0.0.1.nip.io:8080",), None, None, False, False, HOST),
    ("a name that starts with localhost", True, ("localhost.attacker.example",), None, None, False, False, HOST),
    ("a look-alike of a Kimi host", True, ("api.kimi.com.evil.test",), None, None, False, False, HOST),
    ("a LAN address", True, ("192.168.1.5:8080",), None, None, False, False, HOST),
    ("an empty Host", True, ("",), None, None, False, False, HOST),
    ("authority fine, Host header foreign", True, ("127.0.0.1:8080", "attacker.example"), None, None,
     False, False, HOST),
    ("foreign name, kimi_allow_remote", True, ("proxy.lan:8080",), None, None, True, False, None),
    ("foreign name, the client token", True, ("attacker.example:8080",), None, None, False, True, None),
    ("other modes: the Host is the destination", False, ("attacker.example",), None, None, False, False, None),
    # Both modes: the page that sent it.
    ("no Origin (CLI agents)", False, (), None, None, False, False, None),
    ("a local web UI", True, ("127.0.0.1:8080",), "http://localhost:3000", "cross-site", False, False, None),
    ("a local web UI on 127.0.0.1", False, (), "http://127.0.0.1:5173", "same-site", False, False, None),
    ("a local web UI on [::1]", False, (), "http://[::1]:3000", None, False, False, None),
    ("a local web UI over https", False, (), "https://localhost", None, False, False, None),
    ("a local web UI under .localhost", False, (), "http://ui.localhost:3000", None, False, False, None),
    ("a foreign Origin", True, ("127.0.0.1:8080",), EVIL, "cross-site", False, False, PAGE),
    ("a foreign Origin, regular mode", False, (), EVIL, None, False, False, PAGE),
    ("Origin: null (file://, sandboxed frames)", False, (), "null", None, False, False, PAGE),
    ("a foreign Origin named like localhost", False, (), "http://localhost.evil.example", None, False, False, PAGE),
    ("a foreign Origin at a LAN address", False, (), "http://192.168.1.7:3000", None, False, False, PAGE),
    ("an extension's Origin", False, (), "chrome-extension://abcdef", None, False, False, PAGE),
    ("a file Origin", False, (), "file://", None, False, False, PAGE),
    ("two Origins, one foreign", False, (), "http://localhost:3000, https://evil.example", None,
     False, False, PAGE),
    ("an Origin with user info", False, (), "http://user@localhost", None, False, False, PAGE),
    ("an Origin with a path", False, (), "http://localhost:3000/evil", None, False, False, PAGE),
    ("cross-site, no Origin (img, navigation)", False, (), None, "cross-site", False, False, PAGE),
    ("Cross-Site in capitals", False, (), None, " Cross-Site", False, False, PAGE),
    ("two Sec-Fetch-Site, one cross-site", False, (), None, "same-origin, cross-site", False, False, PAGE),
    ("same-origin, no Origin", True, ("127.0.0.1:8080",), None, "same-origin", False, False, None),
    ("same-site, no Origin", False, (), None, "same-site", False, False, None),
    ("typed into the address bar", False, (), None, "none", False, False, None),
    ("a foreign Origin, kimi_allow_remote", False, (), EVIL, "cross-site", True, False, PAGE),
    ("a foreign Origin with the client token", False, (), EVIL, "cross-site", False, True, None),
    ("cross-site with the client token", False, (), None, "cross-site", False, True, None),
]


@pytest.mark.parametrize(
    "reverse,names,origin,fetch_site,allow_remote,token,expected",
    [case[1:] for case in CASES], ids=[case[0] for case in CASES],
)
def test_which_requests_a_page_may_have_sent(
    reverse: bool, names: tuple[str, ...], origin: str | None, fetch_site: str | None,
    allow_remote: bool, token: bool, expected: access.Denial | None,
) -> None:
    assert access.check_page(
        addressed=names if reverse else None, origin=origin, fetch_site=fetch_site,
        own_hosts=OWN, allow_remote=allow_remote, token_presented=token,
    ) == expected


def test_the_refusals_say_what_happened_and_how_to_allow_a_client() -> None:
    assert (HOST.status, HOST.error_type) == (PAGE.status, PAGE.error_type) == (403, "permission_error")
    assert "rebinding" in HOST.message and "kimi_allow_remote" in HOST.message
    assert "localhost" in PAGE.message and "client token" in PAGE.message


# ------------------------------------------------------------ 2. the hook, in-process

TARGET = ("127.0.0.1", 9)


def reverse_flow(host_header: str | None, origin: str | None = None) -> Any:
    """A client's request as the proxy's hooks see it in reverse mode to 127.0.0.1:9."""
    flow = tflow.tflow()
    flow.client_conn.proxy_mode = ProxyMode.parse(f"reverse:http://{TARGET[0]}:{TARGET[1]}")
    flow.client_conn.peername = ("127.0.0.1", 50000)
    flow.server_conn.address = TARGET
    flow.request.scheme = "http"
    flow.request.host, flow.request.port = TARGET
    flow.request.method = "POST"
    flow.request.path = MESSAGES_PATH
    flow.request.headers.clear()
    if host_header is not None:
        flow.request.headers["Host"] = host_header
    if origin is not None:
        flow.request.headers["Origin"] = origin
    flow.request.headers["x-api-key"] = PLACEHOLDER
    return flow


@pytest.fixture
def reverse_addon(keys: list[str], write_accounts) -> Iterator[tuple[KimiRotator, Any]]:
    with addon_in_taddons(write_accounts(keys), Proxyserver(), mode=[f"reverse:http://{TARGET[0]}:{TARGET[1]}"],
                          kimi_hosts=[TARGET[0]], kimi_status="off") as (addon, tctx):
        yield addon, tctx


async def test_reverse_mode_keeps_the_clients_host_and_puts_the_targets_back(reverse_addon, keys) -> None:
    addon, tctx = reverse_addon
    # mitmproxy would overwrite the client's Host before any hook could read it.
    assert tctx.options.keep_host_header is True
    flow = reverse_flow("localhost:8080")
    await call_hook(addon, "request", flow)
    assert flow.response is None
    assert flow.request.headers["x-api-key"] in keys
    assert flow.request.headers.get_all("host") == ["127.0.0.1:9"]  # what Kimi gets, as before


def test_a_request_saying_nothing_of_a_page_skips_the_page_check() -> None:
    # NOTHING_SEEN is what check_page passes whatever the settings; anything a page sends is seen.
    assert access.check_page(addressed=None, origin=None, fetch_site=None, own_hosts=set(),
                             allow_remote=False, token_presented=False) is None
    host = ClientHost()
    assert host.take(tflow.tflow()) is NOTHING_SEEN
    for name, value in (("Origin", "https://page.example"), ("sec-fetch-site", "cross-site")):
        flow = tflow.tflow()
        flow.request.headers[name] = value
        assert host.take(flow) not in (NOTHING_SEEN, None)


async def test_a_rebinding_request_is_refused_in_process(reverse_addon) -> None:
    addon, _ = reverse_addon
    flow = reverse_flow("attacker.example:8080")
    await call_hook(addon, "request", flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert json.loads(flow.response.content)["error"]["message"] == access.FOREIGN_HOST.message
    assert flow.request.headers["x-api-key"] == PLACEHOLDER  # no pool key was put on
    assert sum(a.total_requests for a in addon.pool.accounts) == 0
    assert addon.ledger.get(flow.id) is None  # no answer of it will be counted either
    assert dict(addon.tally.refused) == {"client refused (403)": 1}  # the proxy's own answer, in /metrics


async def test_each_kind_of_refusal_is_logged_once_and_cleaned(reverse_addon, caplog) -> None:
    addon, _ = reverse_addon
    caplog.set_level(logging.WARNING, logger="rotator")
    for _ in range(3):
        await call_hook(addon, "request", reverse_flow("\x1b]52;c;cm0gLXJmIH4=\x07evil.example\x1b[2J"))
        await call_hook(addon, "request", reverse_flow("127.0.0.1:8080", origin="https://evil.example\u202e"))
    lines = [r.getMessage() for r in caplog.records if "web page" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "(Host evil.example)" in lines[0] and access.FOREIGN_HOST.message in lines[0]
    assert "(Origin https://evil.example)" in lines[1] and access.FOREIGN_PAGE.message in lines[1]
    assert not any(c in "".join(lines) for c in "\x1b\x07\u202e")
    assert dict(addon.tally.refused) == {"client refused (403)": 6}


async def test_allow_remote_lifts_the_host_check_not_the_origin_one(keys, write_accounts) -> None:
    """Remote clients name the proxy as they like (proxy.lan); their authentication
    (proxyauth here) is what stops a page. A page's Origin is still refused."""
    with addon_in_taddons(write_accounts(keys), Proxyserver(), proxyauth.ProxyAuth(),
                          mode=[f"reverse:http://{TARGET[0]}:{TARGET[1]}"], proxyauth="any",
                          kimi_allow_remote=True, kimi_hosts=[TARGET[0]], kimi_status="off") as (addon, tctx):
        served = reverse_flow("proxy.lan:8080")
        await call_hook(addon, "request", served)
        assert served.response is None and served.request.headers["x-api-key"] in keys
        refused = reverse_flow("proxy.lan:8080", origin=EVIL)
        await call_hook(addon, "request", refused)
        assert refused.response is not None and refused.response.status_code == 403
        assert json.loads(refused.response.content)["error"]["message"] == access.FOREIGN_PAGE.message


async def test_a_keep_host_header_found_on_still_sends_the_targets_host(keys, write_accounts) -> None:
    """As a script reloaded by mitmproxy finds it (turned on by its first load), or a user
    set it: the client's Host is checked, and Kimi still gets the target's."""
    with addon_in_taddons(write_accounts(keys), Proxyserver(), mode=[f"reverse:http://{TARGET[0]}:{TARGET[1]}"],
                          keep_host_header=True, kimi_hosts=[TARGET[0]], kimi_status="off") as (addon, tctx):
        flow = reverse_flow("localhost:8080")
        await call_hook(addon, "request", flow)
        assert flow.response is None and flow.request.headers.get_all("host") == ["127.0.0.1:9"]
        refused = reverse_flow("attacker.example")
        await call_hook(addon, "request", refused)
        assert refused.response is not None and refused.response.status_code == 403


async def test_regular_mode_leaves_keep_host_header_alone(keys, write_accounts) -> None:
    with addon_in_taddons(write_accounts(keys), Proxyserver(), kimi_status="off") as (addon, tctx):
        assert tctx.options.keep_host_header is False


# ------------------------------------------------------------- 3. real mitmdump, raw HTTP


def raw_exchange(port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"",
                 sock: socket.socket | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request exactly as given (a browser's headers, any Host), read to the end."""
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    conn = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
    with conn:
        conn.sendall(head.encode() + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    if not data:
        return 0, {}, b""  # closed without an answer
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    answer_headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), answer_headers, rest


def page_headers(host: str, origin: str | None = None, fetch_site: str | None = None,
                 content_type: str = "text/plain;charset=UTF-8") -> list[tuple[str, str]]:
    """What a browser sends for fetch(url, {method: "POST", body: "..."}): a simple
    request, no preflight; the page can't set Host, Origin or Sec-Fetch-*."""
    headers = [("Host", host), ("content-type", content_type), ("x-api-key", PLACEHOLDER),
               ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0")]
    if origin is not None:
        headers.append(("Origin", origin))
    if fetch_site is not None:
        headers += [("Sec-Fetch-Site", fetch_site), ("Sec-Fetch-Mode", "cors")]
    return headers


def assert_refused(status: int, headers: dict[str, str], body: bytes, denial: access.Denial,
                   openai: bool = False) -> None:
    assert status == denial.status, body[:300]
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    if openai:  # the shape a client of /chat/completions reads
        assert (error["type"], error["code"]) == ("permission_denied_error", "permission_denied")
    else:
        assert error["type"] == denial.error_type
    assert error["message"] == denial.message
    # Nothing that would let the page read the answer, or send a preflighted request.
    assert not [name for name in headers if name.startswith("access-control-")], headers


def assert_nothing_counted(accounts_path: Path, keys: list[str]) -> None:
    assert counts_on_disk(accounts_path) == {key: (0, 0) for key in keys}


def test_reverse_mode_refuses_rebinding_and_cross_site_pages(
    fake_kimi: FakeKimi, keys, write_accounts, start_proxy, accounts_path
) -> None:
    write_accounts(keys)
    proxy = start_proxy(fake_kimi)
    port = proxy.port
    rebound = f"attacker.example:{port}"
    ours = f"127.0.0.1:{port}"
    refusals: list[tuple[str, str, str, list[tuple[str, str]], access.Denial]] = [
        # DNS rebinding: the page's own name now points here; its requests are same-origin.
        ("rebinding POST", "POST", MESSAGES_PATH,
         page_headers(rebound, f"http://{rebound}", "same-origin"), HOST),
        ("rebinding GET (no Origin)", "GET", "/coding/v1/models",
         [("Host", rebound), ("Sec-Fetch-Site", "same-origin"), ("x-api-key", PLACEHOLDER)], HOST),
        ("bare foreign Host", "POST", MESSAGES_PATH,
         [("Host", rebound), ("x-api-key", PLACEHOLDER), ("content-type", "application/json")], HOST),
        # Cross-site: a page anywhere posts text/plain (no preflight) to 127.0.0.1.
        ("cross-site text/plain", "POST", MESSAGES_PATH, page_headers(ours, EVIL, "cross-site"), PAGE),
        ("cross-site, old browser (Origin only)", "POST", MESSAGES_PATH, page_headers(ours, EVIL), PAGE),
        ("Origin null", "POST", MESSAGES_PATH, page_headers(ours, "null", "cross-site"), PAGE),
        ("cross-site GET without Origin", "GET", "/coding/v1/models",
         [("Host", ours), ("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "no-cors"),
          ("x-api-key", PLACEHOLDER)], PAGE),
        ("CORS preflight", "OPTIONS", MESSAGES_PATH,
         [("Host", ours), ("Origin", EVIL), ("Access-Control-Request-Method", "POST"),
          ("Access-Control-Request-Headers", "content-type,x-api-key"), ("Sec-Fetch-Site", "cross-site")], PAGE),
    ]
    for what, method, path, headers, denial in refusals:
        status, answer_headers, body = raw_exchange(port, method, path, headers, BODY if method == "POST" else b"")
        assert_refused(status, answer_headers, body, denial), what
        assert fake_kimi.requests == [], f"{what}: reached Kimi"
    # The OpenAI-shaped endpoint gets its own shape of the refusal.
    status, answer_headers, body = raw_exchange(
        port, "POST", CHAT_COMPLETIONS_PATH, page_headers(ours, EVIL, "cross-site"), BODY)
    assert_refused(status, answer_headers, body, PAGE, openai=True)
    assert fake_kimi.requests == []

    # Served as before: CLI agents (no Origin), localhost, and a local web UI.
    served = [
        ("curl-like", [("Host", ours), ("x-api-key", PLACEHOLDER), ("content-type", "application/json")]),
        ("by name", [("Host", f"localhost:{port}"), ("x-api-key", PLACEHOLDER),
                     ("content-type", "application/json")]),
        ("local web UI", page_headers(ours, "http://localhost:3000", "cross-site", "application/json")),
    ]
    for what, headers in served:
        status, _, body = raw_exchange(port, "POST", MESSAGES_PATH, headers, BODY)
        assert status == 200, (what, body[:300])
    seen = fake_kimi.requests
    assert [s.key in keys for s in seen] == [True] * len(served)
    # Kimi gets the target's Host, not the client's: as mitmproxy alone sends it.
    assert {s.host for s in seen} == {f"127.0.0.1:{fake_kimi.port}"}
    assert proxy.stop() == 0, proxy.output()
    log = proxy.output()
    assert log.count("refused a request a web page may have sent") == 2, log
    assert f"(Host {rebound}): {HOST.message}" in log and f"(Origin {EVIL}): {PAGE.message}" in log
    counts = counts_on_disk(accounts_path)
    assert sum(total for total, _ in counts.values()) == len(served), counts
    assert all(total == ok for total, ok in counts.values()), counts


def test_a_refused_page_is_counted_nowhere(fake_kimi, keys, write_accounts, start_proxy, accounts_path) -> None:
    """Refusals only: the accounts file, saved at exit, holds no count at all."""
    write_accounts(keys)
    proxy = start_proxy(fake_kimi)
    for headers in (page_headers(f"attacker.example:{proxy.port}"),
                    page_headers(f"127.0.0.1:{proxy.port}", EVIL, "cross-site")):
        assert raw_exchange(proxy.port, "POST", MESSAGES_PATH, headers, BODY)[0] == 403
    assert proxy.stop() == 0, proxy.output()
    assert fake_kimi.requests == []
    assert_nothing_counted(accounts_path, keys)


def chunked(payload: bytes, size: int = 512) -> Iterator[bytes]:
    for i in range(0, len(payload), size):
        yield payload[i:i + size]


def test_a_streamed_upload_is_checked_before_its_headers_go_upstream(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path
) -> None:
    """With stream_large_bodies, headers go upstream from `requestheaders`: the Host is
    checked and put back there too."""
    write_accounts(keys)
    proxy = start_proxy(fake_kimi, options={"stream_large_bodies": "1k"})
    big = json.dumps({"model": "kimi-for-coding", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "x" * 8192}]}).encode()
    with httpx.Client(trust_env=False, timeout=10) as c:
        with pytest.raises(httpx.HTTPError):  # mitmproxy cannot answer a streamed request: closed
            c.post(proxy.url + MESSAGES_PATH, content=chunked(big),
                   headers={"host": f"attacker.example:{proxy.port}", "x-api-key": PLACEHOLDER})
        assert fake_kimi.requests == []
        r = c.post(proxy.url + MESSAGES_PATH, content=chunked(big),
                   headers={"x-api-key": PLACEHOLDER, "content-type": "application/json"})
        assert r.status_code == 200, r.text
    assert [(s.key in keys, s.host) for s in fake_kimi.requests] == [(True, f"127.0.0.1:{fake_kimi.port}")]


def h2_exchange(port: int, ca_cert: Path, authority: str, headers: list[tuple[str, str]],
                body: bytes) -> tuple[int, bytes]:
    """One HTTP/2 POST over TLS (ALPN h2 only), `:authority` as given; (status, body)."""
    tls = ssl.create_default_context(cafile=str(ca_cert))
    tls.set_alpn_protocols(["h2"])
    with tls.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                         server_hostname="127.0.0.1") as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", "POST"), (":scheme", "https"), (":authority", authority),
                                   (":path", MESSAGES_PATH), *headers,
                                   ("content-length", str(len(body)))])
        conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, answer = 0, b""
        while True:
            data = sock.recv(65536)
            assert data, "the proxy closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status, answer
            sock.sendall(conn.data_to_send())


def test_reverse_mode_over_tls_and_http2_reads_the_authority(
    fake_kimi, keys, write_accounts, start_proxy
) -> None:
    """A client that speaks TLS and HTTP/2 to the proxy names it in `:authority`."""
    write_accounts(keys)
    proxy = start_proxy(fake_kimi)
    key = [("x-api-key", PLACEHOLDER), ("content-type", "text/plain")]
    status, body = h2_exchange(proxy.port, proxy.ca_cert, f"attacker.example:{proxy.port}", key, BODY)
    assert status == 403, body[:300]
    assert json.loads(body)["error"]["message"] == HOST.message
    status, body = h2_exchange(proxy.port, proxy.ca_cert, f"127.0.0.1:{proxy.port}",
                               [("origin", EVIL), *key], BODY)
    assert status == 403, body[:300]
    assert json.loads(body)["error"]["message"] == PAGE.message
    assert fake_kimi.requests == []
    status, body = h2_exchange(proxy.port, proxy.ca_cert, f"localhost:{proxy.port}", key, BODY)
    assert status == 200, body[:300]
    assert [(s.key in keys, s.host) for s in fake_kimi.requests] == [(True, f"127.0.0.1:{fake_kimi.port}")]


@pytest.mark.parametrize("strategy", ["eager", "lazy"])
def test_a_tls_reverse_target_is_still_named_in_sni_and_host(
    fake_kimi, keys, write_accounts, accounts_path, tmp_path, strategy
) -> None:
    """Keeping the client's Host must not send the client's name upstream: with
    keep_host_header mitmproxy would pass the client's TLS name (SNI) on to the target."""
    write_accounts(keys)
    front = tmp_path / "front.flows"
    # The "real Kimi": a TLS-terminating mitmdump in front of the fake, recording what it got.
    kimi = start_mitmdump(mode=f"reverse:{fake_kimi.url}", confdir=tmp_path / "kimi",
                          options={"keep_host_header": True}, extra_args=("-w", str(front)))
    ours = None
    try:
        ours = start_mitmdump(
            addons=[ADDON_SCRIPT], mode=f"reverse:https://localhost:{kimi.port}", confdir=tmp_path / "ours",
            options={"kimi_accounts": str(accounts_path), "kimi_hosts": "localhost", "kimi_status": "off",
                     "kimi_usage_interval": "0", "connection_strategy": strategy,
                     "ssl_verify_upstream_trusted_ca": str(kimi.ca_cert)},
        )
        trust = ssl.create_default_context(cafile=str(ours.ca_cert))
        sock = socket.create_connection(("127.0.0.1", ours.port), timeout=10)
        tls = trust.wrap_socket(sock, server_hostname="rotator.localhost")
        status, _, body = raw_exchange(ours.port, "POST", MESSAGES_PATH, [
            ("Host", f"rotator.localhost:{ours.port}"), ("x-api-key", PLACEHOLDER),
            ("content-type", "application/json")], BODY, sock=tls)
        assert status == 200, (body[:300], ours.output())
    finally:
        if ours is not None:
            ours.stop()
        kimi.stop()
    _, flows = saved_flows(front)
    assert [(f.client_conn.sni, f.request.headers.get_all("host")) for f in flows] == [
        ("localhost", [f"localhost:{kimi.port}"])]


def test_regular_mode_refuses_cross_site_pages(
    fake_kimi: FakeKimi, keys, write_accounts, start_proxy, accounts_path
) -> None:
    """A browser set to use the proxy: any page could post to http://api.kimi.com through it."""
    write_accounts(keys)
    proxy = start_proxy(fake_kimi, mode="regular")
    url = "http://api.kimi.com" + MESSAGES_PATH
    for origin, fetch_site in ((EVIL, "cross-site"), (EVIL, None), ("null", "cross-site"), (None, "cross-site")):
        status, headers, body = raw_exchange(proxy.port, "POST", url,
                                             page_headers("api.kimi.com", origin, fetch_site), BODY)
        assert_refused(status, headers, body, PAGE)
    # HTTPS in a CONNECT tunnel, as a browser trusting the CA sends it.
    trust = ssl.create_default_context(cafile=str(proxy.ca_cert))
    with httpx.Client(proxy=proxy.url, verify=trust, trust_env=False, timeout=10) as c:
        r = c.post("https://api.kimi.com" + MESSAGES_PATH, content=BODY,
                   headers={"origin": EVIL, "x-api-key": PLACEHOLDER, "content-type": "text/plain"})
        assert r.status_code == 403 and r.json()["error"]["message"] == PAGE.message
        assert fake_kimi.requests == []
        ok = [c.post("https://api.kimi.com" + MESSAGES_PATH, content=BODY, headers={**extra, "x-api-key": PLACEHOLDER})
              for extra in ({}, {"origin": "http://localhost:3000", "sec-fetch-site": "cross-site"})]
    assert [r.status_code for r in ok] == [200, 200]
    assert [s.key in keys for s in fake_kimi.requests] == [True, True]
    assert proxy.stop() == 0, proxy.output()
    assert sum(total for total, _ in counts_on_disk(accounts_path).values()) == 2


def test_the_client_token_lets_a_client_past_both_checks(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path
) -> None:
    """A page cannot know the token: a client that presents it is one the user set up
    (a web UI on another origin they gave it to). Without it, the token's 401 comes first."""
    write_accounts(keys)
    proxy = start_proxy(fake_kimi, env={"KIMI_ROTATOR_CLIENT_TOKEN": TOKEN})
    port = proxy.port

    def send(host: str, origin: str | None, key: str) -> int:
        headers = [(k, key if k == "x-api-key" else v) for k, v in page_headers(host, origin, "cross-site")]
        return raw_exchange(port, "POST", MESSAGES_PATH, headers, BODY)[0]

    assert send(f"attacker.example:{port}", None, PLACEHOLDER) == 401
    assert send(f"127.0.0.1:{port}", EVIL, PLACEHOLDER) == 401
    assert fake_kimi.requests == []
    assert send(f"attacker.example:{port}", None, TOKEN) == 200
    assert send(f"127.0.0.1:{port}", EVIL, TOKEN) == 200
    assert [s.key in keys for s in fake_kimi.requests] == [True, True]
