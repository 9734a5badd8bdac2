"""In-process doubles for the addon's tests: calling hooks as mitmproxy does, a fake
clock, and a fake upstream that answers our own requests without a network."""

from __future__ import annotations

import heapq
import inspect
import itertools
from collections.abc import Callable
from typing import Any

from mitmproxy import http
from mitmproxy.test import tflow

MESSAGES = "/coding/v1/messages"
NOW = 1_800_000_000_000  # 2027-01-15T08:00:00Z: where a FakeClock starts, the tests' "now"


async def call_hook(addon: Any, name: str, flow: Any = None) -> None:
    """Call a hook as mitmproxy does: await what it returns if that is awaitable."""
    hook = getattr(addon, name, None)
    if hook is None:
        return
    result = hook(flow) if flow is not None else hook()
    if inspect.isawaitable(result):
        await result


def kimi_flow(
    peer: tuple[Any, ...] = ("127.0.0.1", 50000), key: str | None = "sk-kimi-placeholder", host: str = "api.kimi.com"
) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.scheme = "https"
    flow.request.host = host
    flow.request.port = 443
    flow.request.path = MESSAGES
    flow.request.method = "POST"
    if key is not None:
        flow.request.headers["x-api-key"] = key
    flow.client_conn.peername = peer
    return flow


class FakeTimer:
    def __init__(self, clock: FakeClock, entry: list[Any]) -> None:
        self._clock = clock
        self._entry = entry

    def cancel(self) -> None:
        self._entry[2] = None


class FakeClock:
    """Time that moves only when a test says so; callbacks run as it passes them."""

    def __init__(self, now_ms: int = NOW) -> None:
        self.now = now_ms
        self._timers: list[list[Any]] = []
        self._order = itertools.count()

    def now_ms(self) -> int:
        return self.now

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> FakeTimer:
        entry = [when_ms, next(self._order), callback]
        heapq.heappush(self._timers, entry)
        return FakeTimer(self, entry)

    def advance(self, ms: int) -> None:
        """Move time forward, running each timer due on the way at its own moment."""
        end = self.now + ms
        while self._timers and self._timers[0][0] <= end:
            when, _, callback = heapq.heappop(self._timers)
            if callback is None:
                continue
            self.now = max(self.now, when)
            callback()
        self.now = end

    def next_timer_at(self) -> int | None:
        while self._timers and self._timers[0][2] is None:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    @property
    def pending_timers(self) -> int:
        return sum(1 for entry in self._timers if entry[2] is not None)


async def run_virtual(clock: FakeClock, *awaitables: Any, most_ms: int = 3_600_000) -> list[Any]:
    """Run `awaitables` to completion, moving the fake clock from timer to timer."""
    import asyncio

    tasks = [asyncio.ensure_future(a) for a in awaitables]
    spent = 0
    while True:
        for _ in range(20):  # let every ready task run up to its next wait
            await asyncio.sleep(0)
        if all(t.done() for t in tasks):
            return [t.result() for t in tasks]
        due = clock.next_timer_at()
        if due is None or spent >= most_ms:
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            raise AssertionError(f"{len(pending)} task(s) still waiting with no timer due")
        step = max(0, due - clock.now)
        clock.advance(step)
        spent += step
