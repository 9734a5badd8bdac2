"""Conversation affinity: which key a conversation's turn goes to, a layer over the
strategies (issue 25). The pin table (rotator.conversations.pins) remembers; this
decides with the pool's state, on the event loop only (the table is not thread-safe).

- A known conversation's turn takes its pinned key when that key can serve now
  (`KeyPool.can_serve`); otherwise the turn takes the usual path (wait, retry) to
  another key, and the conversation is re-pinned wherever its turn went (`went_to`):
  it does not bounce back.
- A new conversation under `sticky` takes the pool's own choice; under the other
  strategies the usable key with the lowest penalty (1 near its quota reserve or its
  parallel cap, 2 below the health the strategies skip), then the fewest live
  conversations, then the strategy's own choice.
- A key that leaves the pool releases its conversations; a person's use-key or rotate
  (the CLI's, through the store, or a command's: the file's `activeIndex` stamped as a
  person's edit) moves every live conversation to the chosen key. Both are seen when
  the pool adopts a state (its listener event `adopted`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from rotator.conversations.ids import Conversation
from rotator.conversations.pins import PinTable, short_id
from rotator.core import edit_stamps, merge
from rotator.core.health import HEALTH_SKIP_BELOW, effective_health, rest_period_ms
from rotator.core.models import Account
from rotator.pool.events import IgnoresPoolEvents
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.tokens import Usage

# A window with at most this many times the reserve left makes a key a worse choice
# for a new conversation (it will be rested soon, and the conversation moved).
NEAR_RESERVE_FACTOR = 5
NEAR_LIMIT = 1  # the penalty of a key near its quota reserve or its parallel cap
UNHEALTHY = 2  # the penalty of a key the strategies skip while a healthier one serves


class Pinning(enum.Enum):
    PINNED = "pinned"  # its turn went to the key it was pinned to
    NEW = "new"  # its first turn (or first since it expired)
    MOVED = "moved"  # its key could not serve: re-pinned where the turn went


@dataclass(slots=True, eq=False)
class Turn:
    """One client request of a conversation, from its first key to the last it went to."""

    conversation: Conversation
    key: str | None  # the key it is pinned to now (None: new, not pinned yet)
    pinning: Pinning
    # What note() said, and of which pinning: the comment says it as the request is
    # sent and again once it is answered.
    noted: tuple[Pinning, str] | None = field(default=None, repr=False)

    def note(self) -> str:
        """What the flow comment says of it."""
        noted = self.noted
        if noted is None or noted[0] is not self.pinning:
            conversation = self.conversation
            # `_value_`, not `value`: the same string, read without enum's property.
            noted = self.noted = (self.pinning, f"conversation {short_id(conversation.id)} ({conversation.client}) "
                                                f"{self.pinning._value_}")
        return noted[1]


class Affinity(IgnoresPoolEvents):
    """One of the pool's listeners (`adopted`), joined where the pool is built."""

    def __init__(self, pool: KeyPool, table: PinTable) -> None:
        self.pool = pool
        self.table = table
        # When a person last chose the active key, as last seen; None until the pool
        # adopts its first state (a pool starts empty, then loads the store's).
        self._chosen_at: int | None = None
        # Told each time a conversation is pinned or moved here (a team's store shares it).
        self.pinned: Callable[[Turn], None] | None = None

    def begin(self, conversation: Conversation, now_ms: int) -> tuple[Turn, Lease | None]:
        """The turn, and its key if one can serve it now (counted on the pool as
        `acquire` counts); with None the caller waits as usual, then calls `went_to`."""
        table, pool = self.table, self.pool
        key = table.pin_for(conversation.id, now_ms)
        if key is not None and pool.account(key) is None:  # removed from the pool
            table.forget_key(key)
            key = None
        if key is not None:
            lease = pool.acquire_key(key, now_ms)
            return Turn(conversation, key, Pinning.PINNED if lease is not None else Pinning.MOVED), lease
        turn = Turn(conversation, None, Pinning.NEW)
        lease = self._lease_for_new(now_ms)
        if lease is not None:
            self.went_to(turn, lease.key, now_ms)
        return turn, lease

    def went_to(self, turn: Turn, key: str, now_ms: int) -> None:
        """The turn's request is sent with `key` (its first key, after a wait, or a
        retry's): the conversation is pinned there from now on."""
        if turn.key == key:
            return
        conversation = turn.conversation
        if turn.key is None:
            self.table.pin(conversation.id, key, now_ms, conversation.client)
        else:
            self.table.moved(conversation.id, key, now_ms, conversation.client)
            turn.pinning = Pinning.MOVED
        turn.key = key
        if self.pinned is not None:
            self.pinned(turn)

    def spent(self, turn: Turn, usage: Usage) -> None:
        """What the turn's answer spent, added to its conversation's."""
        self.table.spent(turn.conversation.id, usage.input, usage.output, usage.cache_read)

    def adopted(self) -> None:
        """The pool took a new state: keys gone release their conversations, and a
        person's newer choice of the active key takes every conversation there."""
        pool, table = self.pool, self.table
        now = pool.clock.now_ms()
        for key in table.counts(now):
            if pool.account(key) is None:
                table.forget_key(key)
        chosen_at, seen = self._person_chose_at(), self._chosen_at
        self._chosen_at = chosen_at
        if seen is None or chosen_at <= seen:
            return
        state = pool.state
        if 0 <= state.active_index < len(state.accounts):
            table.move_all_to(state.accounts[state.active_index].key, now)

    def _person_chose_at(self) -> int:
        """When a person last chose the active key (use-key, rotate), per the state's stamp."""
        return self.pool.state.edited_at.get(edit_stamps.disk_name(merge.ACTIVE_INDEX), 0)

    def _lease_for_new(self, now_ms: int) -> Lease | None:
        pool = self.pool
        chosen = pool.peek(now_ms)
        if not isinstance(chosen, int):
            return None  # nothing can serve now: the usual wait
        state = pool.state
        if state.rotation_strategy == "sticky":
            return pool.acquire_key(state.accounts[chosen].key, now_ms)
        candidates: list[str] = []
        penalty: dict[str, int] = {}
        rest_ms = rest_period_ms(state)
        for account in state.accounts:
            key = account.key
            if pool.can_serve(key, now_ms) and pool.account(key) is account:  # a key's first entry
                candidates.append(key)
                if effective_health(account, now_ms, rest_ms) < HEALTH_SKIP_BELOW:
                    penalty[key] = UNHEALTHY
                elif self._near_limit(key, account):
                    penalty[key] = NEAR_LIMIT
        key = self.table.choose_new(candidates, now_ms, state.accounts[chosen].key, penalty)
        return None if key is None else pool.acquire_key(key, now_ms)

    def _near_limit(self, key: str, account: Account) -> bool:
        pool = self.pool
        cap = pool.cap(key)
        if cap > 1 and pool.in_flight.get(key, 0) + 1 >= cap:
            return True
        reading = account.quota
        if reading is None:
            return False
        near = pool.quota_reserve_percent * NEAR_RESERVE_FACTOR
        return any(window.is_spent(near) for window in reading.windows)
