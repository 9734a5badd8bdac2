"""Asking Kimi's `/coding/v1/usages` for each key's quota, through mitmproxy itself.

The proxy polls every enabled key once at start (spread out, not all at once), then every
`kimi_usage_interval` seconds the keys used since their last reading, and at once after a
window refusal (that poll also brings the refused key's deadline forward to the exact
reset). At most one poll per key is in flight, however many requests asked. A poll takes
no lease: it is never a request in the key's stats or health. A poll answered 401
disables the key, as a 401 answer to a request does. Polls go out as flows of the
proxy's own (`rotator.proxy.upstream`), so upstream mode and TLS settings apply and
mitmweb shows them, with the key masked like every flow's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from mitmproxy.log import ALERT

from rotator.core import policy
from rotator.core.clock import Clock
from rotator.core.keys import mask_key
from rotator.core.models import Account
from rotator.core.policy import Window
from rotator.core.quota import USAGES_PATH, parse_usages, window_reset
from rotator.pool.key_pool import KeyPool
from rotator.proxy import bodies, upstream
from rotator.proxy.flows import METADATA_KEY, FlowKind, FlowLedger, FlowRecord
from rotator.proxy.upstream import Send

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 300.0
# Polls at start are this far apart at most (and closer when the interval is short).
START_SPREAD_S = 0.5
PREFERRED_HOST = "api.kimi.com"
Target = tuple[str, str, int]  # scheme, host, port


def poll_target(modes: Sequence[str], hosts: Collection[str]) -> Target:
    """Where polls go before any client's request shows it: a reverse mode's Kimi target,
    else https on the Kimi host (api.kimi.com when it is one of them)."""
    for spec in modes:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue
        if isinstance(mode, ReverseMode) and mode.address[0].lower().rstrip(".") in hosts:
            return mode.scheme, mode.address[0], mode.address[1]
    host = PREFERRED_HOST if PREFERRED_HOST in hosts or not hosts else min(hosts)
    return "https", host, 443


def due_for_poll(accounts: Sequence[Account]) -> list[str]:
    """The enabled keys used since their last reading, or never read."""
    return [
        a.key for a in accounts
        if a.disabled_reason is None and (a.quota is None or a.last_used > a.quota.taken_at)
    ]


def enabled_keys(accounts: Sequence[Account]) -> list[str]:
    return [a.key for a in accounts if a.disabled_reason is None]


class QuotaPolls:
    def __init__(self, ledger: FlowLedger, pool: KeyPool, send: Send, clock: Clock) -> None:
        self.ledger = ledger
        self.pool = pool
        self.send = send
        self.clock = clock
        self.interval_s = DEFAULT_INTERVAL_S  # 0: no polling but after a window refusal
        self.default_target: Target = ("https", PREFERRED_HOST, 443)
        # The newest client request to Kimi (set per request: a reference only, read
        # when polling): polls go where it went, with its identity (User-Agent, X-Msh-*).
        self.last_request: http.Request | None = None
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None
        # How the loop waits between polls (a test's fake time stands in for it).
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def __len__(self) -> int:
        return len(self._in_flight)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Start polling (the `running` hook); a no-op when polling is off."""
        if self._loop is None and self.interval_s > 0:
            self._loop = asyncio.get_running_loop().create_task(self._poll_forever())

    def restart(self) -> None:
        """The interval changed: start over with it (a running loop only)."""
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None
            self.start()

    async def stop(self) -> None:
        tasks = list(self._in_flight.values())
        if self._loop is not None:
            tasks.append(self._loop)
            self._loop = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_forever(self) -> None:
        keys = enabled_keys(self.pool.accounts)
        spread = min(START_SPREAD_S, self.interval_s / max(1, len(keys)))
        for key in keys:
            # Spread out, the first one too: nothing goes out while the proxy is starting.
            await self.sleep(spread)
            if self.pool.account(key) is not None:
                self.ask(key)
        while True:
            await self.sleep(self.interval_s)
            for key in due_for_poll(self.pool.accounts):
                self.ask(key)

    # -- asking ----------------------------------------------------------------
    def poll_now(self, keys: Iterable[str] | None = None) -> int:
        """Poll these keys (default: every enabled one) now; returns how many polls started."""
        chosen = enabled_keys(self.pool.accounts) if keys is None else list(keys)
        return sum(self.ask(key) for key in chosen)

    def after_refusal(self, refused: FlowRecord, window: Window) -> None:
        """A window refusal: ask at once, where the refused request went."""
        self.last_request = refused.flow.request
        self.ask(refused.key, window)

    def ask(self, key: str, window: Window | None = None) -> bool:
        """Start a poll for `key` unless one is in flight; whether one started."""
        if key in self._in_flight:
            return False
        seen = self.last_request
        if seen is None:
            scheme, host, port = self.default_target
            identity: list[tuple[bytes, bytes]] = []
        else:
            scheme, host, port = seen.scheme, seen.host, seen.port
            identity = upstream.client_identity(seen)
        poll = upstream.fresh_request("GET", scheme, host, port, USAGES_PATH, identity)
        poll.metadata[METADATA_KEY] = {"quota_poll": mask_key(key)}
        self.ledger.open(FlowRecord(FlowKind.POLL, poll, key, window=window))
        task = asyncio.get_running_loop().create_task(self._send_poll(poll))
        self._in_flight[key] = task
        task.add_done_callback(lambda _: self._in_flight.pop(key, None))
        return True

    async def _send_poll(self, poll: http.HTTPFlow) -> None:
        try:
            await self.send(poll)
        except Exception:
            logger.warning("kimi-rotator: asking Kimi for a key's quota failed", exc_info=True)
        finally:
            self.ledger.forget(poll.id)

    def answered(self, poll: FlowRecord, response: http.Response) -> None:
        now = self.clock.now_ms()
        # Read no further than an error body: an answer from upstream may be a bomb too.
        body = bodies.body_start(response) or b""
        if response.status_code != 200:
            self._refused(poll, response, body, now)
            return
        reading = parse_usages(body, now)
        if reading is None:
            logger.info("kimi-rotator: Kimi's quota answer for %s was not a usages document", mask_key(poll.key))
            return
        events = [self.pool.take_reading(poll.key, reading, now)]
        if poll.window is not None:
            deadline = window_reset(reading, poll.window)
            if deadline is not None:
                events.append(self.pool.set_exact_reset(poll.key, deadline, now))
        for event in events:
            if event:
                logger.log(ALERT, "kimi-rotator: %s", event)
        poll.flow.comment = f"kimi-rotator: quota of {mask_key(poll.key)}"

    def _refused(self, poll: FlowRecord, response: http.Response, body: bytes, now: int) -> None:
        bodies.mask_echoed_key(response, poll.key, body)
        outcome = policy.classify(response.status_code, response.headers, body, now)
        if outcome.disable:  # a revoked or banned key, as a request's answer would say
            event = self.pool.disable(poll.key, outcome.reason, now)
            if event:
                logger.log(ALERT, "kimi-rotator: %s", event)
        poll.flow.comment = f"kimi-rotator: quota of {mask_key(poll.key)} → {outcome.verdict.value}"
