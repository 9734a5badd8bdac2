"""In-flight caps that hold for a whole team: each attempt the pool chose a key for takes
one of the key's team-wide slots (`rotator.store.TeamSlots`) before it is sent.

The pool still caps this process's own requests; a key the team holds at its cap is
skipped (`KeyPool.hold_team_full`) until a notice says a slot on it was given back, or
for `HOLD_MS` (a notice can be missed; a dead proxy's slots expire). A slot goes back
when the pool's request on the key ends, with the next take or at most `GIVE_DELAY_MS`
later (at once if this proxy's take filled the key's cap), so an answer never waits on
the store and a busy proxy makes one round trip per request.

When the store does not answer, requests go on under this process's caps alone: the
problem is logged once, the store is asked again with growing pauses, and team-wide
caps come back when it answers. Requests sent meanwhile hold no slot, and nothing is
given back for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from rotator.core.background import Background
from rotator.core.clock import MS_PER_SECOND, Clock, Timer
from rotator.core.log import ALERT
from rotator.pool.events import IgnoresPoolEvents
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.store import StoreError, TeamSlots
from rotator.store.urls import key_with_id

logger = logging.getLogger(__name__)

HOLD_MS = 500
# Long enough that a busy proxy's next take carries the slot back, short next to
# HOLD_MS: a proxy refused meanwhile hears the "freed" notice this much later.
GIVE_DELAY_MS = 20
RETRY_FIRST_S = 0.25
RETRY_MOST_S = 5.0


class TeamCaps(IgnoresPoolEvents):
    """One of the pool's listeners: it hears `slot_freed` (see `rotator.proxy.assembly`)."""

    def __init__(self, pool: KeyPool, slots: TeamSlots, clock: Clock) -> None:
        self.pool = pool
        self.slots = slots
        self.clock = clock
        self.away: str | None = None  # why the store does not answer, while it doesn't
        self._slotted: Counter[str] = Counter()  # this pool's requests holding a team slot
        self._unslotted: Counter[str] = Counter()  # … and those holding none
        self._sends = Background()  # slots given back, on their way
        self._refreshing: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._stopped = False
        self._flush_timer: Timer | None = None  # the given-back slots' send, planned

    # -- the request path ----------------------------------------------------------
    async def admit(self, lease: Lease) -> bool:
        """Whether the attempt on `lease` may go: False when the team holds its key at
        the cap (the lease is then handed back, uncounted, and the key skipped)."""
        key = lease.key
        if self.away is None:
            try:
                taken = await self.slots.take(key, self.pool.team_cap(key))
            except StoreError as e:
                self._went_away(e)
            else:
                if not self.slots.unsent:
                    self._drop_planned_send()  # the take carried them
                if not taken:
                    self._unslotted[key] += 1  # the abandon below consumes it
                    self.pool.abandon(lease)
                    self.pool.hold_team_full(key)
                    self.clock.call_at(self.clock.now_ms() + HOLD_MS, lambda: self.pool.team_freed(key))
                    return False
                self._slotted[key] += 1
                return True
        self._unslotted[key] += 1
        return True

    def slot_freed(self, key: str) -> None:
        if self._stopped:
            # Stopping or stopped: a request ending while the slots close must not
            # queue a slot that nothing sends any more (`close` gives back every slot
            # still held).
            return
        if self._unslotted[key] > 0:
            self._unslotted[key] -= 1
        elif self._slotted[key] > 0:
            self._slotted[key] -= 1
            if self.slots.give(key, self.pool.team_cap(key)):
                self._flush()
            elif self._flush_timer is None:
                self._flush_timer = self.clock.call_at(self.clock.now_ms() + GIVE_DELAY_MS, self._flush)

    def _flush(self) -> None:
        self._drop_planned_send()
        self._sends.start(self._send_given())

    def _drop_planned_send(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None

    async def _send_given(self) -> None:
        try:
            await self.slots.flush()
        except StoreError as e:
            self._went_away(e)  # the slots are no longer refreshed: they expire

    # -- notices -------------------------------------------------------------------
    def freed(self, key_digest: str) -> None:
        """A notice: another process gave back a slot on the key with this id."""
        key = key_with_id((account.key for account in self.pool.accounts), key_digest)
        if key is not None:
            self.pool.team_freed(key)

    # -- background ----------------------------------------------------------------
    def start(self) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        self._stopped = True  # a send failing from here on starts no reconnecting
        self._drop_planned_send()
        for task in (self._refreshing, self._reconnecting):
            if task is not None:
                task.cancel()
        self._refreshing = self._reconnecting = None
        await self._sends.stop(cancel=False)
        await self.slots.close()

    def set_ttl(self, ttl_ms: int) -> None:
        """A new slot lifetime (kimi_slot_ttl changed): slots refreshed at once, and then
        every third of it."""
        self.slots.ttl_ms = ttl_ms
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_forever(at_once=True))

    async def _refresh_forever(self, at_once: bool = False) -> None:
        if at_once and self.away is None:
            try:
                await self.slots.refresh()
            except StoreError as e:
                self._went_away(e)
        while True:
            await asyncio.sleep(self._ttl_s() / 3)
            if self.away is not None:
                continue
            try:
                await self.slots.refresh()
            except StoreError as e:
                self._went_away(e)

    def _ttl_s(self) -> float:
        return self.slots.ttl_ms / MS_PER_SECOND

    def _went_away(self, error: StoreError) -> None:
        if self.away is not None or self._stopped:
            return
        self.away = str(error)
        logger.warning(
            "kimi-rotator: team-wide in-flight caps paused (%s); each proxy caps its own requests until it answers",
            error,
        )
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        pause_s = RETRY_FIRST_S
        while True:
            await asyncio.sleep(pause_s)
            try:
                await self.slots.refresh()
                await self.slots.ping()
            except StoreError:
                pause_s = min(RETRY_MOST_S, pause_s * 2)
                continue
            self.away = None
            self._reconnecting = None
            logger.log(ALERT, "kimi-rotator: team-wide in-flight caps hold again")
            return
