"""rotator.core.background.Background: work started and not awaited ends, or is cancelled,
when its part stops, and stopping always returns.

Each stop runs on an event loop of its own in a thread, joined with a time limit: a
stop that spins (never giving its loop a turn) would hang the suite instead of failing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from rotator.core.background import Background

LIMIT_S = 10.0


def finishes(scenario: Callable[[], Coroutine[Any, Any, list[str]]]) -> list[str]:
    """Run `scenario` on a fresh loop in a daemon thread; what it returned, or a failure
    if it has not finished within LIMIT_S."""
    result: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(scenario()))
        except BaseException as e:  # handed to the test's thread
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(LIMIT_S)
    assert not thread.is_alive(), f"Background.stop did not return within {LIMIT_S:.0f} s"
    if errors:
        raise errors[0]
    return result[0]


def test_stop_returns_when_its_tasks_ended_before_the_loop_dropped_them() -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        background = Background()

        async def quick() -> None:
            seen.append("ran")

        background.start(quick())
        # One turn of the loop: the task runs and ends, and the callback that takes it out
        # of the set is only queued. Gathering tasks that have all ended does not yield,
        # so a stop waiting for the set to empty would spin here.
        await asyncio.sleep(0)
        await background.stop(cancel=False)
        seen.append("stopped")
        return seen

    assert finishes(scenario) == ["ran", "stopped"]


def test_stop_waits_for_work_started_while_it_waits() -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        background = Background()
        release = asyncio.Event()

        async def second() -> None:
            await release.wait()
            seen.append("second ended")

        async def first() -> None:
            background.start(second())  # started while stop waits for this one
            seen.append("first ended")

        background.start(first())
        asyncio.get_running_loop().call_later(0.05, release.set)
        await background.stop(cancel=False)
        seen.append("stopped")
        return seen

    assert finishes(scenario) == ["first ended", "second ended", "stopped"]


def test_stop_with_cancel_cancels_what_is_running_and_keeps_errors_to_the_tasks() -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        background = Background()

        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        async def broken() -> None:
            raise RuntimeError("its own to log")

        background.start(forever())
        background.start(broken())
        await asyncio.sleep(0)
        await background.stop(cancel=True)
        seen.append("stopped")
        return seen

    assert finishes(scenario) == ["cancelled", "stopped"]
