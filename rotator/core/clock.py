"""The one clock: what time it is (ms since the epoch) and how to be called back later.

Everything that reads the time takes it from here, or from a `Clock` handed to it, so
tests can run hours of cooldowns in an instant with `FakeClock`-style doubles.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

MS_PER_SECOND = 1000
# How far ahead of now a recorded moment (a person's edit stamp) may lie and still be
# believed: clocks a few seconds apart. Further ahead, it was written by a clock that ran
# ahead (another machine's, this one's before an NTP step back) or by hand, and counts
# as now (`not_ahead`).
AHEAD_SLACK_MS = 2_000


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch, as the accounts file stores times."""
    return time.time_ns() // 1_000_000


def seconds_until(deadline_ms: int, now: int) -> int:
    """Whole seconds from now to the deadline, rounded up (never 0 while it is ahead)."""
    return max(0, -(-(deadline_ms - now) // MS_PER_SECOND))


def not_ahead(moment_ms: int, now: int) -> int:
    """`moment_ms`, or `now` if it lies more than `AHEAD_SLACK_MS` in the future."""
    return now if moment_ms > now + AHEAD_SLACK_MS else moment_ms


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """The time, and callbacks at a moment of it: what waiting code needs injected."""

    def now_ms(self) -> int: ...

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Timer: ...


class SystemClock:
    """The real clock; callbacks run on the running asyncio loop."""

    now_ms = staticmethod(now_ms)  # read for every request: no extra call in between

    def call_at(self, when_ms: int, callback: Callable[[], None]) -> Timer:
        delay_s = max(0, when_ms - now_ms()) / MS_PER_SECOND
        return asyncio.get_running_loop().call_later(delay_s, callback)


SYSTEM_CLOCK = SystemClock()
