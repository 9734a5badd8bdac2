"""Requests waiting for a key: one line, served in arrival order.

When a key may have freed up (an answer, a cooldown's end, a change from the store) the
line is served from its head, a lease at a time, and stops at the first request the
pool cannot serve: a freed key wakes only the requests it can serve, and nobody
rescans the pool for nothing. One timer covers the whole line: the soonest of a key
leaving its cooldown and a request reaching its deadline. Kept apart from the pool so
the pool stays synchronous and the waiting, the only part that needs asyncio, is one
small piece.

A request whose client has left is given up, not served: its place is dropped when the
line next moves (the proxy sees a client leave by looking: mitmproxy runs no hook of the
request's flow for it while the request's own hook is pending), and a key it got just
then goes back uncounted.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from rotator.core.clock import Timer
from rotator.core.strategies import Unavailable
from rotator.pool.events import IgnoresPoolEvents
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease


class Abandoned(enum.Enum):
    """The request was given up while it waited (its client left): no key, none counted."""

    CLIENT_LEFT = "the client left"


ABANDONED = Abandoned.CLIENT_LEFT
Gone = Callable[[], bool]  # whether the request's client has left


def never_gone() -> bool:
    return False


@dataclass(slots=True, eq=False)
class _Waiter:
    tried: Collection[str]
    deadline_ms: int
    future: asyncio.Future[Lease | Unavailable | Abandoned]
    gone: Gone


Admit = Callable[[Lease], Awaitable[bool]]  # whether a chosen key may be used


class WaitLine(IgnoresPoolEvents):
    """The line; one of the pool's listeners (it hears `key_freed`: see
    `rotator.proxy.assembly`)."""

    def __init__(self, pool: KeyPool, admit: Admit | None = None) -> None:
        self.pool = pool
        self._waiters: list[_Waiter] = []
        self._timer: Timer | None = None
        # With team-wide caps (rotator.sync.team_caps): whether a chosen key may be used.
        self.admit = admit

    def __len__(self) -> int:
        return len(self._waiters)

    async def acquire(
        self, deadline_ms: int, tried: Collection[str] = (), gone: Gone = never_gone
    ) -> Lease | Unavailable | Abandoned:
        """A key, waiting in line (not spinning) up to `deadline_ms` for one to free up;
        ABANDONED once `gone()` says the request's client has left."""
        while True:
            got = await self._wait(deadline_ms, tried, gone)
            if isinstance(got, Lease) and self.admit is not None and not gone() and not await self.admit(got):
                continue  # the team holds that key at its cap: the pool skips it now
            if isinstance(got, Lease) and gone():  # before the team's answer, or while it came
                self.pool.abandon(got)  # never sent: as if never chosen
                return ABANDONED
            return got

    async def _wait(self, deadline_ms: int, tried: Collection[str], gone: Gone) -> Lease | Unavailable | Abandoned:
        if gone():
            return ABANDONED
        now = self.pool.clock.now_ms()
        got = self.pool.acquire_preferring_untried(now, tried)
        if isinstance(got, Lease) or not self._worth_waiting(got, now, deadline_ms):
            return got
        waiter = _Waiter(tried, deadline_ms, asyncio.get_running_loop().create_future(), gone)
        self._waiters.append(waiter)
        self._schedule(now, got)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # Served just as the request was given up: hand the key back uncounted.
            if waiter.future.done() and not waiter.future.cancelled():
                result = waiter.future.result()
                if isinstance(result, Lease):
                    self.pool.abandon(result)
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _worth_waiting(self, why: Unavailable, now: int, deadline_ms: int) -> bool:
        if now >= deadline_ms:
            return False
        frees_at = why.available_at_ms
        if frees_at is not None and frees_at <= deadline_ms:
            return True  # a cooldown or the shared pause ends in time
        return self.pool.has_busy_keys  # a key at its in-flight cap frees on its next answer

    def key_freed(self) -> None:
        self.serve()

    def serve(self) -> None:
        """Hand keys to waiting requests in order, as long as the pool has one to give."""
        if not self._waiters:
            return
        now = self.pool.clock.now_ms()
        served = 0
        shortage: Unavailable | None = None
        for waiter in self._waiters:
            if waiter.future.done():  # given up meanwhile
                served += 1
                continue
            if waiter.gone():
                waiter.future.set_result(ABANDONED)
                served += 1
                continue
            got = self.pool.acquire_preferring_untried(now, waiter.tried)
            if isinstance(got, Lease):
                waiter.future.set_result(got)
                served += 1
                continue
            shortage = got
            break
        del self._waiters[:served]
        # Whoever is left may have run out of time, or out of reasons to wait.
        if shortage is not None:
            keep: list[_Waiter] = []
            for waiter in self._waiters:
                if waiter.future.done():
                    continue
                if waiter.gone():
                    waiter.future.set_result(ABANDONED)
                elif self._worth_waiting(shortage, now, waiter.deadline_ms):
                    keep.append(waiter)
                else:
                    waiter.future.set_result(shortage)
            self._waiters = keep
        self._schedule(now, shortage)

    def _schedule(self, now: int, shortage: Unavailable | None) -> None:
        """One timer for the queue: the soonest of a key freeing and a waiter's deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiters:
            return
        wake = min(w.deadline_ms for w in self._waiters)
        if shortage is not None and shortage.available_at_ms is not None:
            wake = min(wake, shortage.available_at_ms)
        self._timer = self.pool.clock.call_at(max(wake, now + 1), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.serve()
