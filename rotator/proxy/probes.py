"""Asking Kimi's /coding/v1/usages when a key's plan window really resets.

A window refusal cools a key for the window's worst case; the probe, sent with the
refused key, brings the deadline forward to the exact reset. One probe per key at a
time, however many requests that key refused meanwhile; probes end when the proxy stops.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import http
from mitmproxy.log import ALERT

from rotator.clock import Clock
from rotator.keys import mask_key
from rotator.policy import Window
from rotator.pool import KeyPool
from rotator.proxy import bodies, upstream
from rotator.proxy.flows import METADATA_KEY, FlowKind, FlowLedger, FlowRecord
from rotator.proxy.upstream import Send
from rotator.quota import USAGES_PATH, parse_usages, window_reset

logger = logging.getLogger(__name__)


class UsageProbes:
    def __init__(self, ledger: FlowLedger, pool: KeyPool, send: Send, clock: Clock) -> None:
        self.ledger = ledger
        self.pool = pool
        self.send = send
        self.clock = clock
        self._in_flight: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._in_flight)

    async def stop(self) -> None:
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def ask(self, refused: FlowRecord, window: Window) -> None:
        """Ask /coding/v1/usages with the exhausted key when its window really resets:
        one probe per key at a time, however many requests it refused."""
        key = refused.key
        if key in self._in_flight:
            return
        request = refused.flow.request
        probe = upstream.fresh_request(
            "GET", request.scheme, request.host, request.port, USAGES_PATH, upstream.client_identity(request)
        )
        probe.metadata[METADATA_KEY] = {"usage_probe": mask_key(key)}
        self.ledger.open(FlowRecord(FlowKind.PROBE, probe, key, window=window))
        task = asyncio.get_running_loop().create_task(self._send_probe(probe))
        self._in_flight[key] = task
        task.add_done_callback(lambda _: self._in_flight.pop(key, None))

    async def _send_probe(self, probe: http.HTTPFlow) -> None:
        try:
            await self.send(probe)
        except Exception:
            logger.warning("kimi-rotator: asking Kimi for the exact reset time failed", exc_info=True)
        finally:
            self.ledger.forget(probe.id)

    def answered(self, probe: FlowRecord, response: http.Response) -> None:
        if response.status_code != 200 or probe.window is None:
            return
        now = self.clock.now_ms()
        # Read no further than an error body: an answer from upstream may be a bomb too.
        deadline = window_reset(parse_usages(bodies.body_start(response) or b"", now), probe.window)
        if deadline is None:
            return
        event = self.pool.set_exact_reset(probe.key, deadline, now)
        if event:
            logger.log(ALERT, "kimi-rotator: %s", event)
