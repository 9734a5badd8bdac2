"""Work a part of the proxy starts and does not await: kept until it ends (so the event
loop's weak reference is not its only one), and awaited, or cancelled, when the part
stops."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, cancel: bool) -> None:
        """Wait until every task has ended, those started meanwhile included (cancelled
        first with `cancel`); their errors are theirs to log."""
        # Asks which tasks have not ended rather than which are still in the set: a task
        # leaves the set by a callback the loop runs later, and gathering tasks that have
        # all ended returns without giving the loop a turn, so waiting for the set to
        # empty would spin forever.
        while unfinished := [task for task in self._tasks if not task.done()]:
            if cancel:
                for task in unfinished:
                    task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
