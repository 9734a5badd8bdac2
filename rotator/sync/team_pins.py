"""Conversation pins kept in step with a team's store (conversation affinity, issue 25):
before a turn, the team's pin of its conversation is put in this proxy's pin table;
whenever this proxy pins or moves a conversation, the team hears of it.

So a conversation keeps its key whichever proxy of the team serves its turn (several
proxies behind one load balancer). The local table stays the one the decision reads
(rotator.pool.affinity); the store is asked once per turn of a named conversation, on
the path that already waits for the team's slot. A store that does not answer costs
nothing but the sharing: each proxy then keeps its own pins, and says so once.
"""

from __future__ import annotations

import logging

from rotator.conversations.ids import Conversation
from rotator.conversations.pins import PinTable
from rotator.core.background import Background
from rotator.core.clock import Clock
from rotator.pool.affinity import Turn
from rotator.pool.key_pool import KeyPool
from rotator.store import TeamPins
from rotator.store.urls import key_id, key_with_id

logger = logging.getLogger(__name__)


class SharedPins:
    def __init__(self, pins: TeamPins, table: PinTable, pool: KeyPool, clock: Clock) -> None:
        self.pins = pins
        self.table = table
        self.pool = pool
        self.clock = clock
        self._telling = Background()
        self._failing = False

    async def recall(self, conversation: Conversation) -> None:
        """Before a turn: where the team has the conversation, in the local table too (a
        pin only here, not in the store, is told to it)."""
        cid = conversation.id
        try:
            shared = await self.pins.recall(cid, self.table.ttl_ms)
        except Exception as e:  # the store away, or an ACL without GETEX: local pins only
            self._failed(e)
            return
        self._worked()
        now = self.clock.now_ms()
        key = None if shared is None else key_with_id((a.key for a in self.pool.accounts), shared)
        here = self.table.key_of(cid, now)
        if key is not None and key != here:
            # Another proxy pinned or moved it; its turn is counted as `begin` takes it.
            self.table.pin(cid, key, now, conversation.client, turns=0)
        elif key is None and here is not None:
            self._tell(cid, here)

    def pinned(self, turn: Turn) -> None:
        """This proxy pinned the turn's conversation (new) or moved it: the team follows."""
        if turn.key is not None:
            self._tell(turn.conversation.id, turn.key)

    def start(self) -> None:
        pass  # nothing runs between turns

    async def stop(self) -> None:
        await self._telling.stop(cancel=False)
        await self.pins.close()

    def _tell(self, conversation_id: str, key: str) -> None:
        self._telling.start(self._remember(conversation_id, key_id(key)))

    async def _remember(self, conversation_id: str, shown_key: str) -> None:
        try:
            await self.pins.remember(conversation_id, shown_key, self.table.ttl_ms)
        except Exception as e:
            self._failed(e)

    def _failed(self, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            logger.warning(
                "kimi-rotator: the team store does not share conversation pins (%s): each proxy keeps its own",
                type(error).__name__,
            )

    def _worked(self) -> None:
        if self._failing:
            self._failing = False
            logger.info("kimi-rotator: the team store shares conversation pins again")
