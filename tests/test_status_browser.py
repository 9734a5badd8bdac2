"""The status page in a real headless Chromium against a real mitmdump with the addon:
the DOM after the page's script ran (a cooling key's countdown, a quota bar, masked keys,
an event on the timeline, never a full key), and a screenshot of it.

Chromium is Debian's (`apt-get install chromium`; .ci/run installs it). Without it these
tests fail, never skip: a browser test that silently stopped running is no test.
Set KIMI_UPDATE_SCREENSHOT=1 to write the screenshot to docs/status-page.png (the one the
README shows) instead of only checking it.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from rotator.core.clock import now_ms
from rotator.core.models import Account, AccountsFile
from rotator.core.quota import QuotaReading, QuotaWindow
from rotator.store import file as storage
from testbed.fake_kimi import FakeKimi
from testbed.processes import REPO_ROOT, Proxy
from tests.support.accounts import fake_keys
from tests.support.harness import poll

KEYS = fake_keys(5)
SCREENSHOT = REPO_ROOT / "docs" / "status-page.png"
STATUS_URL = re.compile(r"kimi-rotator: status page at (http://127\.0\.0\.1:\d+/)")
MESSAGES = "/coding/v1/messages"
BODY = {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "chromium is not installed, and the status page's browser tests need it. Install it: "
            "`apt-get install chromium` (Debian/Ubuntu; .ci/run does this)",
            pytrace=False,
        )
    return found


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on `url`, run until the page's timers have had 4 s of virtual time."""
    profile.mkdir(parents=True, exist_ok=True)
    cmd = [
        chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--no-proxy-server", f"--user-data-dir={profile}",
        "--virtual-time-budget=4000", *args, url,
    ]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


# -- the DOM Chromium printed, as a small tree to query ---------------------------------

VOID = {"meta", "link", "br", "img", "input", "hr", "area", "base", "col", "source", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    parts: list[str | Node] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text for p in self.parts)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def all(self, match: Callable[[Node], bool]) -> Iterator[Node]:
        for child in self.children:
            if match(child):
                yield child
            yield from child.all(match)

    def find(self, cls: str | None = None, **attrs: str) -> list[Node]:
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return list(self.all(lambda n: (cls is None or cls in n.classes)
                             and all(n.attrs.get(k) == v for k, v in wanted.items())))

    def one(self, cls: str | None = None, **attrs: str) -> Node:
        found = self.find(cls, **attrs)
        assert len(found) == 1, (cls, attrs, len(found))
        return found[0]


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        self.stack[-1].parts.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].parts.append(data)


def parse_dom(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# -- a proxy with keys in every state ----------------------------------------------------

@pytest.fixture
def status_proxy(fake_kimi: FakeKimi, accounts_path: Path, start_proxy: Callable[..., Proxy]) -> tuple[str, int]:
    """A real mitmdump with five keys (serving, cooling for 10 min, a quota reading, half-open,
    one Kimi disables), some traffic through it; returns (page URL, when it was set up)."""
    now = now_ms()
    reading = QuotaReading(
        taken_at=now - 20_000,
        windows=[
            QuotaWindow(minutes=300, limit=200, used=50, reset_time=now + 3_600_000),
            QuotaWindow(minutes=7 * 24 * 60, limit=2048, used=1720, reset_time=now + 3 * 86_400_000),
        ],
        parallel_limit=5,
    )
    accounts = [
        Account(key=KEYS[0], name="Personal", total_requests=120, successful_requests=117,
                response_times=[640, 810, 720, 1300, 590]),
        Account(key=KEYS[1], name="Work", health_score=70, rate_limit_reset_time=now + 600_000,
                cooldown_reason="rate limited (429)", total_requests=64, successful_requests=58, last_used=now),
        Account(key=KEYS[2], name="Team", quota=reading, total_requests=33, successful_requests=33,
                response_times=[900, 1100]),
        Account(key=KEYS[3], name="Spare", cooldown_level=1, health_score=55, last_used=now),
        Account(key=KEYS[4], name="Old laptop"),
    ]
    storage.write_accounts(accounts_path, AccountsFile(accounts=accounts, rotation_strategy="round-robin"))
    fake_kimi.set_kimi_error(KEYS[4], "invalid_auth")  # Kimi refuses it: disabled, live
    proxy = start_proxy(fake_kimi, options={"kimi_status": "127.0.0.1:0"})
    found = proxy.wait_for_output(STATUS_URL, timeout=10)
    assert found, proxy.output()
    url = found.group(1)
    with httpx.Client(trust_env=False, timeout=10) as http:
        for _ in range(5):  # round-robin over the usable keys: 0, 2, 3, 4 (refused, resent on 0), 2
            assert http.post(proxy.url + MESSAGES, json=BODY, headers={"x-api-key": "sk-kimi-placeholder"}).is_success
        assert poll(lambda: http.get(url + "status.json").json()["keys"][4]["state"] == "disabled", 5)
    return url, now


def test_the_page_in_a_real_browser(status_proxy: tuple[str, int], tmp_path: Path) -> None:
    url, _ = status_proxy
    dom_text = chromium(url, tmp_path / "profile", "--dump-dom").stdout
    for key in KEYS:
        assert key not in dom_text and key[8:] not in dom_text
    dom = parse_dom(dom_text)
    body = dom.one(None, **{"data-loaded": "true"})
    assert body.tag == "body"
    assert dom.one(None, id="strategy").text == "round-robin"
    assert dom.one(None, id="key-count").text == "5"
    assert dom.one(None, id="error").attrs.get("hidden") is not None  # the fetch worked

    cards = {int(n.attrs["data-key-index"]): n for n in dom.find("key")}
    assert sorted(cards) == [0, 1, 2, 3, 4]
    for index, card in cards.items():
        assert card.one("key-masked").text == f"sk-kim…{KEYS[index][-4:]}"
    names = [cards[i].one("key-name").text for i in range(5)]
    assert names == ["[0] Personal", "[1] Work", "[2] Team", "[3] Spare", "[4] Old laptop"]

    cooling = cards[1]
    assert cooling.attrs["data-state"] == "cooling"
    countdown = cooling.one("countdown").text
    # With the clock time it ends at (issue 27): "· free in 9m 58s (at 14:05)".
    assert re.fullmatch(r"· free in (9m \d{1,2}s|10m 0s) \(at \d\d:\d\d\)", countdown), countdown
    assert cooling.one("key-reason").text == "rate limited (429)"
    assert cooling.one("health-value").text == "70%"

    quota = cards[2]
    five_hour = quota.one("quota-window", data_window="5-hour")
    bar = five_hour.one("quota-bar")
    assert bar.attrs["data-ratio"] == "0.750"
    assert bar.one("fill").attrs["style"] == "width: 75%;"
    assert five_hour.one("quota-label").text == "150 / 200 left"
    assert re.fullmatch(r"resets in (1h 00m|59m \d{1,2}s) \(at \d\d:\d\d\)", five_hour.one("quota-reset").text)
    weekly = quota.one("quota-window", data_window="weekly")
    assert weekly.one("quota-bar").attrs["data-ratio"] == "0.160"
    assert "low" in weekly.one("quota-bar").one("fill").classes
    assert re.fullmatch(r"resets in (3d 0h|2d 23h) \(at \w{2,4}\.? \d\d:\d\d\)", weekly.one("quota-reset").text)
    assert quota.one("in-flight").text == "in flight0 / 5"

    assert [i for i, card in cards.items() if card.attrs["data-state"] == "serving"] in ([], [0], [2], [3])

    disabled = cards[4]
    assert disabled.attrs["data-state"] == "disabled"
    assert "off" in disabled.one("health-bar").one("fill").classes  # grey, not a green bar (issue 27)
    assert "off" not in cards[0].one("health-bar").one("fill").classes
    assert disabled.one("key-reason").text  # why, as the pool says it
    events = [li.text for li in dom.one(None, id="timeline").find("event")]
    assert any("disabled" in e and f"sk-kim…{KEYS[4][-4:]}" in e for e in events), events
    # Its five recorded times, plus this test's requests on loopback (about 1 ms each).
    assert re.fullmatch(r"median latency(640|680|720) ms", cards[0].one("latency").text)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_a_screenshot_of_the_page(status_proxy: tuple[str, int], tmp_path: Path) -> None:
    url, _ = status_proxy
    shot = tmp_path / "status-page.png"
    chromium(url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,800", "--hide-scrollbars")
    assert png_size(shot) == (1200, 800)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    if os.environ.get("KIMI_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    assert png_size(SCREENSHOT) == (1200, 800)  # the README's picture is there


def test_the_page_passes_its_token_on(fake_kimi: FakeKimi, accounts_path: Path, tmp_path: Path,
                                      start_proxy: Callable[..., Proxy]) -> None:
    """With a client token, the page opened as /?token=... sends it with its own fetches;
    opened without it, the browser gets the 401 that says how to pass it."""
    token = "page-token-5f0c9a1e"
    (tmp_path / "token").write_text(token)
    storage.write_accounts(accounts_path, AccountsFile(accounts=[Account(key=KEYS[0], name="Only")]))
    proxy = start_proxy(fake_kimi, options={"kimi_status": "127.0.0.1:0",
                                            "kimi_client_token_file": str(tmp_path / "token")})
    found = proxy.wait_for_output(STATUS_URL, timeout=10)
    assert found, proxy.output()
    url = found.group(1)
    dom = parse_dom(chromium(f"{url}?token={token}", tmp_path / "with", "--dump-dom").stdout)
    assert dom.one("key", data_key_index="0").one("key-masked").text == f"sk-kim…{KEYS[0][-4:]}"
    assert dom.one(None, id="error").attrs.get("hidden") is not None
    refused = chromium(url, tmp_path / "without", "--dump-dom").stdout
    assert "data-key-index" not in refused and "?token=" in refused, refused


class _GoneAfterFirst:
    """The page served as the proxy serves it, whose status.json answers once and then
    fails, as when the proxy has stopped behind an open page."""

    def __init__(self, document: dict[str, object]) -> None:
        import http.server
        import json
        import threading

        from rotator.proxy.status_page import load_page

        page, _ = load_page()
        answers = [json.dumps(document).encode()]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.startswith("/status.json") and answers:
                    body, kind, status = answers.pop(), "application/json", 200
                elif self.path.startswith("/status.json"):
                    body, kind, status = b"gone", "text/plain", 503
                else:
                    body, kind, status = page, "text/html; charset=utf-8", 200
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_a_page_whose_proxy_stopped_says_its_cards_are_the_last_known_state(tmp_path: Path) -> None:
    now = now_ms()
    key = {"index": 0, "name": "Personal", "maskedKey": "sk-kim…abcd", "state": "serving", "active": True,
           "reason": None, "untilMs": 0, "health": 100, "lowHealth": False, "inFlight": 0, "cap": 5,
           "requests": 3, "successfulRequests": 3, "successRate": 100.0, "medianLatencyMs": 640,
           "outcomes": {}, "retries": 0, "quota": None}
    server = _GoneAfterFirst({"now": now, "strategy": "health-based", "activeIndex": 0, "pausedUntilMs": 0,
                              "refused": {}, "keys": [key], "timeline": []})
    try:
        dom = parse_dom(chromium(server.url, tmp_path / "profile", "--dump-dom").stdout)
    finally:
        server.close()
    assert dom.one(None, **{"data-loaded": "true"}).attrs["data-stale"] == "true"
    assert dom.one("key-state").text == "last known: serving"  # not "serving" (issue 27)
    error = dom.one(None, id="error")
    assert error.attrs.get("hidden") is None
    assert error.text.startswith("the proxy is not answering: cannot read status.json (503: gone)")


@pytest.mark.slow
def test_a_store_that_cannot_be_read_is_on_the_page_and_no_key_advice_that_would_fail(tmp_path: Path) -> None:
    problem = ("cannot read the accounts file /home/u/kimi-accounts.json: not valid JSON (line 1); "
               "no keys to serve and not writing until it is fixed")
    server = _GoneAfterFirst({"now": now_ms(), "strategy": "health-based", "activeIndex": 0, "pausedUntilMs": 0,
                              "refused": {}, "keys": [], "timeline": [],
                              "store": {"location": "/home/u/kimi-accounts.json", "problem": problem}})
    try:
        dom = parse_dom(chromium(server.url, tmp_path / "profile", "--dump-dom").stdout)
    finally:
        server.close()
    banner = dom.one(None, id="store-problem")
    assert banner.attrs.get("hidden") is None and banner.text == problem
    assert dom.one(None, id="keys").text == "No keys to show: the store above needs fixing first"
    assert "add-key" not in dom.one(None, id="keys").text


@pytest.mark.slow
def test_the_page_lists_where_notifications_go_and_the_last_ones(tmp_path: Path) -> None:
    now = now_ms()
    server = _GoneAfterFirst({
        "now": now, "strategy": "health-based", "activeIndex": 0, "pausedUntilMs": 0, "refused": {},
        "keys": [], "timeline": [], "store": None,
        "notify": {"channels": ["ntfys://ntfy.sh", "json://127.0.0.1:9"],
                   "recent": [{"atMs": now - 60_000, "title": "Kimi key [1] Work disabled", "delivered": 1,
                               "failed": 1}]},
    })
    try:
        dom = parse_dom(chromium(server.url, tmp_path / "profile", "--dump-dom").stdout)
    finally:
        server.close()
    assert dom.one(None, id="notify").attrs.get("hidden") is None
    assert dom.one(None, id="notify-channels").text == "ntfys://ntfy.sh, json://127.0.0.1:9"
    [sent] = dom.one(None, id="notify-recent").find("sent")
    assert sent.text.endswith("Kimi key [1] Work disabled (1 URL failed)")


@pytest.mark.slow
def test_the_page_lists_each_conversation_with_what_it_spent(tmp_path: Path) -> None:
    now = now_ms()
    server = _GoneAfterFirst({
        "now": now, "strategy": "health-based", "activeIndex": 0, "pausedUntilMs": 0, "refused": {},
        "keys": [], "timeline": [], "store": None, "notify": None,
        "sessions": [{"id": "0b7c6a1e-59f…", "client": "claude-code", "maskedKey": "sk-kim…abcd", "turns": 3,
                      "moves": 0, "firstSeenMs": now - 60_000, "lastSeenMs": now,
                      "tokens": {"input": 8800, "output": 114, "cacheRead": 8000}, "cacheShare": 8000 / 8800}],
    })
    try:
        dom = parse_dom(chromium(server.url, tmp_path / "profile", "--dump-dom").stdout)
    finally:
        server.close()
    assert dom.one(None, id="sessions").attrs.get("hidden") is None
    [row] = dom.one(None, id="session-list").find("session")
    assert row.text == "0b7c6a1e-59f… (claude-code) on sk-kim…abcd · 3 turns · in 8800, 91% from cache · out 114"
