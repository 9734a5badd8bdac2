"""The live status page, /status.json and /metrics, served on their own loopback port:
the `kimi_status` option, the listener's lifecycle (started in `running`, restarted when
the option changes, stopped in `done`) and who may read what.

A part of KimiRotator (loaded and run by it: no addon of its own), reading its pool, tally, timeline,
clock and settings. What the pages say is built elsewhere: rotator.status.document (the
snapshot and the JSON), rotator.status.metrics (Prometheus), status_page.html (the page).
The same rule as the proxy's decides who may read them (rotator.core.access.check_client),
and, with remote clients allowed, the client token is required from other machines.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import logging
import re
from importlib import resources
from collections.abc import Awaitable
from typing import Any

from mitmproxy import ctx, exceptions

from rotator.core import access
from rotator.core.background import Background
from rotator.status import document, metrics
from rotator.status.http_server import Request, Response, StatusServer, plain

logger = logging.getLogger(__name__)

OPTION = "kimi_status"
DEFAULT_ADDRESS = "127.0.0.1:8766"
PAGE_FILE = "status_page.html"
TOKEN_PARAMETER = "token"
COMMON_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
NO_TOKEN_FOR_REMOTE = (
    "the status page serves other machines only with a client token "
    "(kimi_client_token_file or $KIMI_ROTATOR_CLIENT_TOKEN)"
)
NEEDS_TOKEN = (
    "the status page needs the client token: send it as Authorization: Bearer or x-api-key, "
    f"or open the page as /?{TOKEN_PARAMETER}=..."
)
LOCAL_ONLY = "the status page only serves clients on this machine (kimi_allow_remote is off)"
FOREIGN_HOST = "the status page answers only requests addressed to this machine (Host: 127.0.0.1 or localhost)"


def parse_address(text: str) -> tuple[str, int] | None:
    """`HOST:PORT` (an IP address, `[v6]`, or localhost; port 0 picks a free one), or
    None for `off`. ValueError if it is neither."""
    value = text.strip()
    if value.lower() == "off":
        return None
    host, colon, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif host != "localhost":
        ipaddress.IPv4Address(host)  # a v6 address needs its brackets
    if not colon or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(port_text)
    return host, int(port_text)


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def load_page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy: only its own inline style and script
    (by their hashes) may run, and it may fetch from its own origin only."""
    text = resources.files(__package__).joinpath(PAGE_FILE).read_text(encoding="utf-8")
    hashes = {
        tag: " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
            for body in re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)
        )
        for tag in ("style", "script")
    }
    policy = (
        f"default-src 'none'; style-src {hashes['style']}; script-src {hashes['script']}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return text.encode(), policy


def _json_answer(shot: document.Snapshot) -> Response:
    return Response(200, document.status_json(shot), "application/json; charset=utf-8")


def _metrics_answer(shot: document.Snapshot, accept: str) -> Response:
    body, content_type = metrics.render_snapshot(shot, accept)
    return Response(200, body, content_type)


class StatusPage:
    def __init__(self, rotator: Any) -> None:
        self.rotator = rotator
        self.address: tuple[str, int] | None = parse_address(DEFAULT_ADDRESS)
        self.url: str | None = None  # where it listens now
        self.server: StatusServer | None = None
        self._page: tuple[bytes, str] | None = None
        self._running = False
        self._switch = asyncio.Lock()
        self._restarts = Background()

    # -- options and lifecycle ---------------------------------------------------------
    def load(self, loader: Any) -> None:
        loader.add_option(
            OPTION, str, DEFAULT_ADDRESS,
            "Where the live status page (/, /status.json, /metrics) listens: HOST:PORT (port 0 picks "
            "a free one), or off.",
        )

    def configure(self, updated: set[str]) -> None:
        if OPTION not in updated:
            return
        try:
            address = parse_address(ctx.options.kimi_status)
        except ValueError:
            raise exceptions.OptionsError(
                f"{OPTION}: {ctx.options.kimi_status!r} is not HOST:PORT (an IP address or localhost, "
                "port 0-65535) or off"
            ) from None
        changed = address != self.address
        self.address = address
        if changed and self._running:
            self._restarts.start(self._restart())

    def running(self) -> Awaitable[None] | None:
        """Start listening, if on (None if off: nothing to wait for)."""
        self._running = True
        return None if self.address is None else self._restart()

    async def _restart(self) -> None:
        async with self._switch:  # one change at a time, in order
            await self._stop()
            if self.address is not None and self._running:
                if self._page is None:
                    self._page = await asyncio.to_thread(load_page)
                await self._start(*self.address)

    async def done(self) -> None:
        self._running = False
        await self._restarts.stop(cancel=True)
        async with self._switch:
            await self._stop()

    async def _start(self, host: str, port: int) -> None:
        server = StatusServer(self.answer, COMMON_HEADERS)
        try:
            bound = await server.start(host, port)
        except OSError as e:
            logger.warning(
                "kimi-rotator: the status page cannot listen on %s:%d (%s); the proxy runs without it. "
                "Choose another address with --set %s=127.0.0.1:PORT, or turn it off with %s=off",
                host, port, e.strerror or e, OPTION, OPTION,
            )
            return
        self.server = server
        self.url = url_of(host, bound[1])
        logger.info("kimi-rotator: status page at %s", self.url)
        if not access.is_loopback_host(host) and not self.rotator.settings.allow_remote:
            logger.warning(
                "kimi-rotator: the status page listens on %s, beyond this machine, but kimi_allow_remote "
                "is off: other machines get 403", self.url,
            )

    async def _stop(self) -> None:
        server, self.server, self.url = self.server, None, None
        if server is not None:
            await server.stop()

    # -- answers -----------------------------------------------------------------------
    def snapshot(self) -> document.Snapshot:
        rotator = self.rotator
        sync = rotator.sync
        store = None if sync is None else document.StoreReading(sync.store.location, sync.problem_said)
        pins = rotator.pins if rotator.settings.affinity else None
        return document.snapshot(
            rotator.pool, rotator.tally, rotator.timeline.newest_first(), rotator.clock.now_ms(), store,
            self._notify_reading(), pins,
        )

    def _notify_reading(self) -> document.NotifyReading | None:
        notify = getattr(self.rotator, "notify", None)  # the bench's stand-in has none
        if notify is None or not notify.notifier.channels():
            return None
        notifier = notify.notifier
        recent = tuple((s.at_ms, s.title, s.delivered, s.failed) for s in notifier.recent())
        return document.NotifyReading(tuple(notifier.channels()), recent)

    @staticmethod
    async def _in_thread(shot: document.Snapshot, write: Any, *args: Any) -> Response:
        # The pool is read on the event loop (a consistent snapshot, no locks); writing the
        # body (megabytes of text at 1,000 keys: bench/README.md) happens in a worker
        # thread, so the loop keeps serving requests meanwhile.
        return await asyncio.to_thread(write, shot, *args)

    def answer(self, request: Request) -> Response | Awaitable[Response]:
        refusal = self.refusal(request)
        if refusal is not None:
            return refusal
        if request.method not in ("GET", "HEAD"):
            return plain(405, "only GET and HEAD", ("Allow", "GET, HEAD"))
        if request.path in ("/", "/index.html"):
            page, policy = self._page or load_page()
            return Response(200, page, "text/html; charset=utf-8", (("Content-Security-Policy", policy),))
        if request.path == "/status.json":
            return self._in_thread(self.snapshot(), _json_answer)
        if request.path == "/metrics":
            return self._in_thread(self.snapshot(), _metrics_answer, request.headers.get("accept", ""))
        return plain(404, "not found: the status page has /, /status.json and /metrics")

    def refusal(self, request: Request) -> Response | None:
        """The answer for a client that may not read the page, else None."""
        settings = self.rotator.settings
        from_loopback = access.is_loopback_address(request.peer)
        if not from_loopback and settings.allow_remote and settings.client_token is None:
            return plain(403, NO_TOKEN_FOR_REMOTE)
        host = request.headers.get("host")
        if not settings.allow_remote and host is not None and not access.is_loopback_host(access.host_part(host)):
            return plain(403, FOREIGN_HOST)  # a page elsewhere whose name was made to point here
        denial = access.check_client(
            from_loopback=from_loopback,
            allow_remote=settings.allow_remote,
            client_token=settings.client_token,
            presented=self.presented(request) if settings.client_token else None,
        )
        if denial is None:
            return None
        if denial.status == 401:
            return plain(401, NEEDS_TOKEN, ("WWW-Authenticate", 'Bearer realm="kimi-rotator"'))
        return plain(denial.status, LOCAL_ONLY)

    @staticmethod
    def presented(request: Request) -> str | None:
        found = access.presented_credential(request.headers)
        if found is None:
            values = request.query.get(TOKEN_PARAMETER)
            found = values[0] if values else None
        return found
