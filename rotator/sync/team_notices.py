"""What the processes on a shared store tell each other, wired to this proxy's pool: a
key this pool cooled or disabled is saved at once, so the store tells the others;
another process's change is read at once (`PoolSync.soon`); a slot freed on a key the
team held at its cap lets this pool choose it again (`TeamCaps.freed`), a rate limit one
proxy sees counts towards every proxy's throttle detection (`KeyPool.heard_limit`), and a
throttle one proxy detects pauses every proxy's keys (`KeyPool.pause_for`).

Notices only hurry what would happen anyway: the save loop still reads the store about
once an interval and held keys are retried after `team_caps.HOLD_MS`, so a notice lost
(the store away, a listener reconnecting) costs time, never state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from rotator.core.background import Background
from rotator.core.clock import Clock
from rotator.core.log import ALERT
from rotator.pool.events import IgnoresPoolEvents
from rotator.pool.key_pool import KeyPool
from rotator.store import Notice, NoticeKind, StoreError, TeamEvents
from rotator.store.urls import key_id, key_with_id
from rotator.sync.save_loop import PoolSync
from rotator.sync.team_caps import TeamCaps

logger = logging.getLogger(__name__)


class TeamNotices(IgnoresPoolEvents):
    """One of the pool's listeners: it hears `paused`, `limited` and `state_changed`
    (see `rotator.proxy.assembly`), and tells the team, until it stops."""

    def __init__(self, events: TeamEvents, pool: KeyPool, sync: PoolSync, caps: TeamCaps | None, clock: Clock) -> None:
        self.events = events
        self.pool = pool
        self.sync = sync
        self.caps = caps
        self.clock = clock
        self._listening: asyncio.Task[None] | None = None
        self._telling = Background()
        self._stopped = False

    def heard(self, notice: Notice) -> None:
        if notice.kind is NoticeKind.STATE:
            self.sync.soon()
        elif notice.kind is NoticeKind.FREED:
            if self.caps is not None:
                self.caps.freed(notice.key_id)
        elif notice.kind is NoticeKind.PAUSE:
            self.pool.pause_for(notice.pause_ms, self.clock.now_ms())
        elif notice.kind is NoticeKind.LIMITED:
            key = key_with_id((account.key for account in self.pool.accounts), notice.key_id)
            line = None if key is None else self.pool.heard_limit(key, self.clock.now_ms())
            if line is not None:
                logger.log(ALERT, "kimi-rotator: %s (rate limits seen across the team)", line)

    def start(self) -> None:
        if self._listening is None:
            self._listening = asyncio.get_running_loop().create_task(
                self.events.listen(self.heard, self.sync.soon)
            )

    async def stop(self) -> None:
        self._stopped = True  # the pool's events are not told from here on
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
            self._listening = None
        await self._telling.stop(cancel=False)
        await self.events.close()

    # -- the pool's events ------------------------------------------------------------
    def state_changed(self) -> None:
        if not self._stopped:
            self.sync.soon()  # a cooldown or a disabled key is saved, and told, now

    def paused(self, pause_ms: int) -> None:
        if not self._stopped:
            self._tell(self.events.pause(pause_ms), "a pause")

    def limited(self, key: str) -> None:
        if not self._stopped:
            self._tell(self.events.limited(key_id(key)), "a rate limit")

    def _tell(self, telling: Coroutine[Any, Any, None], what: str) -> None:
        self._telling.start(self._try(telling, what))

    @staticmethod
    async def _try(telling: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await telling
        except StoreError as e:
            logger.debug("kimi-rotator: could not tell the team of %s: %s", what, e)
