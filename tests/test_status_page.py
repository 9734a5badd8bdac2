"""The status page addon through mitmproxy's test context, with its real listener on
127.0.0.1 (port 0): what /status.json, /metrics and / answer, who may read them, the
kimi_status option (off, a busy port, a change while running), hostile clients, and
never a full key in any answer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.test import taddons
from prometheus_client.parser import text_string_to_metric_families

from rotator.core.clock import now_ms
from rotator.core.models import Account, AccountsFile
from rotator.core.quota import QuotaReading, QuotaWindow
from rotator.proxy.addon import KimiRotator
from rotator.proxy.status_page import StatusPage, parse_address
from rotator.status import http_server
from rotator.status.http_server import Request
from rotator.store import file as storage
from tests.support.accounts import KEYS
from tests.support.in_process import addon_in_taddons

TOKEN = "team-token-0123456789"


def write_page_pool(path: Path) -> Path:
    """Three keys a page shows differently: one used, one cooling, one with a quota reading."""
    now = now_ms()
    reading = QuotaReading(
        taken_at=now, windows=[QuotaWindow(minutes=300, limit=200, used=50, reset_time=now + 3_600_000)],
        parallel_limit=5,
    )
    accounts = [
        Account(key=KEYS[0], name="Personal", total_requests=4, successful_requests=3, response_times=[100, 300]),
        Account(key=KEYS[1], name="Work", rate_limit_reset_time=now + 600_000, cooldown_reason="rate limited (429)"),
        Account(key=KEYS[2], name="Spare", quota=reading),
    ]
    storage.write_accounts(path, AccountsFile(accounts=accounts, rotation_strategy="round-robin"))
    return path


def page_of(rotator: KimiRotator) -> StatusPage:
    return rotator.status_page


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **options: object) -> AsyncIterator[tuple[KimiRotator, StatusPage, taddons.context]]:
    """The rotator with its status page, configured and running, stopped at the end."""
    accounts = write_page_pool(tmp_path / "kimi-accounts.json")
    with addon_in_taddons(accounts, **{"kimi_status": "127.0.0.1:0", **options}) as (rotator, tctx):
        await tctx.master.addons.invoke_addon(rotator, hooks.RunningHook())
        try:
            yield rotator, page_of(rotator), tctx
        finally:
            await tctx.master.addons.invoke_addon(rotator, hooks.DoneHook())


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=5)


def no_full_key(*texts: str) -> None:
    for text in texts:
        for key in KEYS:
            assert key not in text
            assert key[8:] not in text  # not even without its prefix


@pytest.mark.slow
async def test_status_json_over_the_listener(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with running(tmp_path) as (rotator, page, _):
        assert page.url is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+/", page.url)
        assert f"kimi-rotator: status page at {page.url}" in caplog.text
        rotator.tally.attempt_ended(KEYS[0], "success")
        rotator.tally.answered_itself("every key is cooling down")
        async with client() as http:
            answer = await http.get(page.url + "status.json")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
        assert answer.headers["cache-control"] == "no-store"
        doc = answer.json()
        keys = {k["index"]: k for k in doc["keys"]}
        assert doc["strategy"] == "round-robin" and doc["refused"] == {"every key is cooling down": 1}
        assert [keys[i]["state"] for i in range(3)] == ["serving", "cooling", "ready"]
        assert keys[0]["maskedKey"] == "sk-kim…" + KEYS[0][-4:] and keys[0]["outcomes"] == {"success": 1}
        assert keys[0]["successRate"] == 75.0 and keys[0]["medianLatencyMs"] == 200
        assert keys[1]["reason"] == "rate limited (429)" and keys[1]["untilMs"] > doc["now"]
        assert keys[2]["cap"] == 5 and keys[2]["quota"]["windows"][0]["remainingRatio"] == 0.75
        no_full_key(answer.text)


@pytest.mark.slow
async def test_metrics_parse_as_prometheus_text(tmp_path: Path) -> None:
    async with running(tmp_path) as (rotator, page, _):
        rotator.tally.attempt_ended(KEYS[0], "success")
        rotator.tally.attempt_ended(KEYS[0], "rate_limited")
        rotator.tally.retried(KEYS[2])
        async with client() as http:
            answer = await http.get(page.url + "metrics")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        no_full_key(answer.text)
        families = {f.name: f for f in text_string_to_metric_families(answer.text)}
        assert families["kimi_rotator_key_requests"].type == "counter"

        def sample(family: str, **labels: str) -> float:
            found = [s.value for s in families[family].samples if labels.items() <= s.labels.items()]
            assert len(found) == 1, (family, labels, families[family].samples)
            return found[0]

        masked = "sk-kim…" + KEYS[0][-4:]
        assert sample("kimi_rotator_key_requests", index="0", name="Personal", masked_key=masked, outcome="success") == 1
        assert sample("kimi_rotator_key_requests", index="0", outcome="rate_limited") == 1
        assert sample("kimi_rotator_key_retries", index="2") == 1
        assert 590 < sample("kimi_rotator_key_seconds_until_usable", index="1") <= 600
        assert sample("kimi_rotator_key_quota_remaining_ratio", index="2", window="5-hour") == 0.75
        assert sample("kimi_rotator_key_in_flight_cap", index="2") == 5
        assert sample("kimi_rotator_key_health", index="0") == 100
        assert sample("kimi_rotator_paused_seconds") == 0


@pytest.mark.slow
async def test_the_page_itself(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, page, _):
        async with client() as http:
            answer = await http.get(page.url)
            head = await http.head(page.url + "status.json")
        assert answer.status_code == 200 and answer.headers["content-type"] == "text/html; charset=utf-8"
        html = answer.text
        assert "<script>" in html and 'fetch("status.json"' in html
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no external assets
        assert "innerHTML" not in html
        policy = answer.headers["content-security-policy"]
        script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0


@pytest.mark.slow
async def test_unknown_paths_and_methods(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, page, _):
        async with client() as http:
            assert (await http.get(page.url + "nothing")).status_code == 404
            assert (await http.get(page.url + "status.json/more")).status_code == 404
            for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
                answer = await http.request(method, page.url + "status.json", content=b"x" * 100_000)
                assert answer.status_code == 405 and answer.headers["allow"] == "GET, HEAD"


def request(path: str = "/status.json", peer: str = "192.0.2.9", host: str = "kimi-box:8766",
            headers: dict[str, str] | None = None, query: str = "") -> Request:
    head = (f"GET {path}{query} HTTP/1.1\r\nHost: {host}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n").encode()
    made = http_server.parse_head(head, (peer, 50000))
    assert made is not None
    return made


async def answered(page: StatusPage, made: Request) -> http_server.Response:
    """The page's answer, awaited if it is written in a worker thread."""
    response = page.answer(made)
    return await response if inspect.isawaitable(response) else response


@pytest.mark.slow
async def test_other_machines_are_refused_unless_allowed(tmp_path: Path) -> None:
    async with running(tmp_path) as (_, page, _):
        assert (await answered(page, request())).status == 403
        assert (await answered(page, request(peer="127.0.0.1", host="127.0.0.1:8766"))).status == 200
        assert (await answered(page, request(peer="::1", host="[::1]:8766"))).status == 200
        assert (await answered(page, request(peer="127.0.0.1", host="localhost"))).status == 200
        # A page elsewhere whose name was pointed at 127.0.0.1 (DNS rebinding) reads nothing.
        assert (await answered(page, request(peer="127.0.0.1", host="evil.example:8766"))).status == 403


@pytest.mark.slow
async def test_with_remote_clients_allowed_the_token_is_required(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    async with running(tmp_path, kimi_allow_remote=True, kimi_client_token_file=str(token_file)) as (_, page, _):
        denied = await answered(page, request())
        assert denied.status == 401 and denied.headers == (("WWW-Authenticate", 'Bearer realm="kimi-rotator"'),)
        assert b"?token=" in denied.body
        assert (await answered(page, request(headers={"Authorization": "Bearer wrong"}))).status == 401
        assert (await answered(page, request(headers={"Authorization": f"Bearer {TOKEN}"}))).status == 200
        assert (await answered(page, request(headers={"x-api-key": TOKEN}))).status == 200
        assert (await answered(page, request(path="/", query=f"?token={TOKEN}"))).status == 200
        assert (await answered(page, request(path="/metrics", query="?token=nope"))).status == 401
        # Local clients need it too, as the proxy's rule has it: over the real listener.
        async with client() as http:
            assert (await http.get(page.url + "status.json")).status_code == 401
            answer = await http.get(page.url + "status.json", params={"token": TOKEN})
            assert answer.status_code == 200
            assert (await http.get(page.url + "metrics", headers={"x-api-key": TOKEN})).status_code == 200


@pytest.mark.slow
async def test_remote_clients_allowed_by_proxyauth_alone_do_not_get_the_page(tmp_path: Path) -> None:
    async with running(tmp_path) as (rotator, page, _):
        # As kimi_allow_remote with proxyauth and no client token leaves the settings.
        rotator.settings = dataclasses.replace(rotator.settings, allow_remote=True, client_token=None)
        answer = await answered(page, request())
        assert answer.status == 403 and b"client token" in answer.body
        assert (await answered(page, request(peer="127.0.0.1", host="127.0.0.1"))).status == 200


@pytest.mark.slow
async def test_off_means_no_listener_and_a_change_restarts_it(tmp_path: Path) -> None:
    async with running(tmp_path, kimi_status="off") as (rotator, page, tctx):
        assert page.url is None and page.server is None
        tctx.configure(rotator, kimi_status="127.0.0.1:0")
        first = await wait_for_url(page, None)
        async with client() as http:
            assert (await http.get(first + "status.json")).status_code == 200
        with socket.socket() as s:  # a port to move to, free a moment ago
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tctx.configure(rotator, kimi_status=f"127.0.0.1:{port}")
        second = await wait_for_url(page, first)
        assert second == f"http://127.0.0.1:{port}/"
        async with client() as http:
            assert (await http.get(second + "metrics")).status_code == 200
            with pytest.raises(httpx.ConnectError):
                await http.get(first + "status.json")
        tctx.configure(rotator, kimi_status="off")
        for _ in range(100):
            if page.server is None:
                break
            await asyncio.sleep(0.01)
        assert page.url is None
        async with client() as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(second + "status.json")


async def wait_for_url(page: StatusPage, other_than: str | None) -> str:
    for _ in range(200):
        if page.url is not None and page.url != other_than:
            return page.url
        await asyncio.sleep(0.01)
    raise AssertionError("the status page did not (re)start")


@pytest.mark.slow
async def test_a_busy_port_is_a_warning_not_a_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        caplog.set_level(logging.INFO)
        async with running(tmp_path, kimi_status=f"127.0.0.1:{port}") as (rotator, page, _):
            assert page.url is None
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "status page" in r.getMessage()]
            assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0].getMessage()
            assert "kimi_status" in warnings[0].getMessage()
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("rotator")]
            assert len(rotator.pool.accounts) == 3  # the proxy itself goes on


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:99999", "127.0.0.1:http", "example.com:80", "::1:8766",
                                   ":8766", "on", "[nope]:1"])
def test_bad_values_name_the_option(value: str) -> None:
    with addon_in_taddons() as (rotator, tctx):
        with pytest.raises(exceptions.OptionsError, match="kimi_status"):
            tctx.configure(rotator, kimi_status=value)


def test_good_values() -> None:
    assert parse_address("127.0.0.1:8766") == ("127.0.0.1", 8766)
    assert parse_address(" OFF ") is None
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("localhost:9000") == ("localhost", 9000)
    assert parse_address("0.0.0.0:8766") == ("0.0.0.0", 8766)


async def raw(url: str, data: bytes, wait_s: float = 3.0) -> bytes:
    """Send `data` on a fresh connection; everything the page answers until it closes."""
    host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()


@pytest.mark.slow
async def test_hostile_clients_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT_S", 0.3)
    async with running(tmp_path) as (_, page, _):
        # A head that never ends is cut at the size limit.
        answer = await raw(page.url, b"GET /status.json HTTP/1.1\r\nX-Pad: " + b"a" * (http_server.MAX_HEAD + 10))
        assert answer.startswith(b"HTTP/1.1 431 ")
        # A client that sends nothing, or half a head, is dropped after the timeout.
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await raw(page.url, b"") == b""
        assert await raw(page.url, b"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\n") == b""
        assert loop.time() - started < 2.5
        # Not HTTP/1.x, or a target that is not a path.
        assert (await raw(page.url, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await raw(page.url, b"GET http://x/ HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        assert (await raw(page.url, b"GET / HTTP/2.0\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        # Many idle connections at once: beyond the cap they are closed at once, and the page
        # still answers once they are gone.
        idle = [await asyncio.open_connection("127.0.0.1", int(page.url.rsplit(":", 1)[1].rstrip("/")))
                for _ in range(http_server.MAX_CONNECTIONS + 5)]
        extra_reader = idle[-1][0]
        assert await asyncio.wait_for(extra_reader.read(), 2) == b""
        for _, writer in idle:
            writer.close()
        await asyncio.sleep(0.5)
        assert (await raw(page.url, b"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")


@pytest.mark.slow
async def test_never_a_full_key_even_in_text_set_in_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # mitmproxy logs ALERT; the timeline keeps those lines
    async with running(tmp_path) as (rotator, page, _):
        # Text that reached the pool without the model's cleaning, quoting a key.
        rotator.pool.accounts[2].disabled_reason = f"Kimi said: invalid key {KEYS[2]}"
        rotator.pool.accounts[1].cooldown_reason = f"limited {KEYS[1]}"
        logging.getLogger("rotator.test").log(logging.INFO + 1, "kimi-rotator: key %s cooling", KEYS[0])
        async with client() as http:
            bodies = [(await http.get(page.url + path)).text for path in ("", "status.json", "metrics")]
        no_full_key(*bodies)
        doc = json.loads(bodies[1])
        keys = {k["index"]: k for k in doc["keys"]}
        assert keys[2]["state"] == "disabled" and keys[2]["reason"] == f"Kimi said: invalid key sk-kim…{KEYS[2][-4:]}"
        assert keys[1]["reason"] == f"limited sk-kim…{KEYS[1][-4:]}"
        assert doc["timeline"][0]["text"] == f"key sk-kim…{KEYS[0][-4:]} cooling"  # on the timeline, masked
