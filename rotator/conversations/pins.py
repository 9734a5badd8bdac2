"""The pin table: which key each live conversation is pinned to, in memory, with the
time passed in; and where a new conversation should go (the key with fewest).

Rules:
- a conversation is live while it was seen less than `ttl_ms` ago (default 30 min of
  silence); an expired one is gone, and its next request is a new conversation;
- the table holds at most `max_conversations` (default 10,000: far more than the
  parallel agents a pool of keys can serve, in a few MB: bench/README.md);
  a new one beyond that drops the one seen longest ago;
- `pin_for` is called once per client request (not per retry): it counts the turn;
- a conversation whose key cannot serve is re-pinned where its turn went (`moved`)
  and stays there: nothing moves it back;
- `forget_key` (a key removed) releases its conversations; `move_all_to` (a person's
  use-key / rotate) moves every live one to that key, which each follows at its next
  turn; new conversations spread over the keys again afterwards.

Costs: the table is an OrderedDict in order of last seen, so refreshing is
`move_to_end` and expiry pops from the front: O(1), amortised, per request. Live
conversations per key are counted as they change, never by a scan. `choose_new` is
O(candidates), once per new conversation; `forget_key`, `move_all_to` and `sessions`
scan the table, and run only on a person's action or a status read.

The table's clock never goes back: a `now_ms` older than one seen before counts as that
one (wall clocks step), which keeps the order by last seen, and so expiry, right.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rotator.conversations.ids import OTHER

DEFAULT_TTL_MS = 30 * 60 * 1000
DEFAULT_MAX_CONVERSATIONS = 10_000
SHOWN_ID_LENGTH = 12  # characters of an id shown before the ellipsis


@dataclass(slots=True)
class _Pin:
    key: str
    client: str
    turns: int
    first_seen_ms: int
    last_seen_ms: int
    moves: int = 0
    # What its turns spent, as Kimi said: all input, output, of the input read from cache.
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0


@dataclass(frozen=True, slots=True)
class SessionView:
    """One live conversation as the status page shows it (`key` as `label` gave it)."""

    id: str
    client: str
    key: str
    turns: int
    moves: int
    first_seen_ms: int
    last_seen_ms: int
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0

    @property
    def cache_share(self) -> float | None:
        """Of its input, the share Kimi read from its prompt cache (None before any)."""
        return self.cache_read_tokens / self.input_tokens if self.input_tokens else None


def short_id(conversation_id: str) -> str:
    """The id as shown: its first `SHOWN_ID_LENGTH` characters, an ellipsis if cut."""
    if len(conversation_id) <= SHOWN_ID_LENGTH + 1:
        return conversation_id
    return conversation_id[:SHOWN_ID_LENGTH] + "…"


class PinTable:
    """Live conversations and their keys. Not thread-safe: one event loop owns it."""

    def __init__(self, ttl_ms: int = DEFAULT_TTL_MS, max_conversations: int = DEFAULT_MAX_CONVERSATIONS) -> None:
        if ttl_ms <= 0 or max_conversations <= 0:
            raise ValueError("ttl_ms and max_conversations must be positive")
        self.ttl_ms = ttl_ms
        self.max_conversations = max_conversations
        self._pins: OrderedDict[str, _Pin] = OrderedDict()  # oldest seen first
        self._live: dict[str, int] = {}  # key -> live conversations on it (no zeros)
        self._now_ms = 0

    # -- per request ---------------------------------------------------------------
    def pin_for(self, conversation_id: str, now_ms: int) -> str | None:
        """The key `conversation_id` is pinned to (counting this turn and refreshing
        its last seen), or None if it is new or expired."""
        now = self._expire(now_ms)
        pin = self._pins.get(conversation_id)
        if pin is None:
            return None
        pin.turns += 1
        pin.last_seen_ms = now
        self._pins.move_to_end(conversation_id)
        return pin.key

    def choose_new(
        self,
        candidates: Sequence[str],
        now_ms: int,
        preferred: str | None = None,
        penalty: Mapping[str, int] | None = None,
    ) -> str | None:
        """The key for a new conversation among `candidates` (the usable keys, in the
        strategy's order): the lowest `penalty` first (0 when absent: give e.g. 1 to a
        key near its quota reserve, 2 to one at its parallel limit), then the fewest
        live conversations, then `preferred` (the strategy's own choice), then the
        order given. None if there are no candidates."""
        self._expire(now_ms)
        live = self._live
        best: str | None = None
        best_rank: tuple[int, int, int, int] | None = None
        for order, key in enumerate(candidates):
            rank = (penalty.get(key, 0) if penalty else 0, live.get(key, 0), key != preferred, order)
            if best_rank is None or rank < best_rank:
                best, best_rank = key, rank
        return best

    def pin(self, conversation_id: str, key: str, now_ms: int, client: str = OTHER, turns: int = 1) -> None:
        """Pin a new conversation (its first turn) to `key`; an existing one is
        re-pinned as by `moved`, without counting a move. `turns=0`: a pin learnt from
        elsewhere (a team's store), whose turn `pin_for` counts next."""
        now = self._expire(now_ms)
        pin = self._pins.get(conversation_id)
        if pin is not None:
            self._repin(conversation_id, pin, key, now)
            return
        if len(self._pins) >= self.max_conversations:
            _, oldest = self._pins.popitem(last=False)
            self._less(oldest.key)
        self._pins[conversation_id] = _Pin(key, client, turns, now, now)
        self._live[key] = self._live.get(key, 0) + 1

    def moved(self, conversation_id: str, new_key: str, now_ms: int, client: str = OTHER) -> None:
        """Its key could not serve and the turn went to `new_key`: the conversation is
        pinned there from now on. One not in the table (expired meanwhile) is pinned."""
        now = self._expire(now_ms)
        pin = self._pins.get(conversation_id)
        if pin is None:
            self.pin(conversation_id, new_key, now, client)
            return
        if pin.key != new_key:
            pin.moves += 1
        self._repin(conversation_id, pin, new_key, now)

    # -- on a person's action --------------------------------------------------------
    def forget_key(self, key: str) -> int:
        """A removed key releases its conversations: each is new at its next turn.
        Returns how many were released."""
        gone = [cid for cid, pin in self._pins.items() if pin.key == key]
        for cid in gone:
            del self._pins[cid]
        self._live.pop(key, None)
        return len(gone)

    def move_all_to(self, key: str, now_ms: int) -> int:
        """A person chose `key` (use-key, rotate): every live conversation is pinned
        to it and goes there at its next turn. Returns how many changed key."""
        self._expire(now_ms)
        changed = 0
        for pin in self._pins.values():
            if pin.key != key:
                pin.key = key
                pin.moves += 1
                changed += 1
        self._live = {key: len(self._pins)} if self._pins else {}
        return changed

    # -- reading -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pins)

    def key_of(self, conversation_id: str, now_ms: int) -> str | None:
        """The key a live conversation is pinned to, without counting a turn."""
        self._expire(now_ms)
        pin = self._pins.get(conversation_id)
        return None if pin is None else pin.key

    def live(self, key: str) -> int:
        """Live conversations pinned to `key` (as of the last time given)."""
        return self._live.get(key, 0)

    def counts(self, now_ms: int) -> dict[str, int]:
        """Live conversations per key, for keys that have any."""
        self._expire(now_ms)
        return dict(self._live)

    def sessions(self, now_ms: int, label: Callable[[str], str]) -> list[SessionView]:
        """The live conversations, most recently seen first, for display. `label`
        shows a key (pass the masking function: keys here are whole keys)."""
        self._expire(now_ms)
        return [
            SessionView(short_id(cid), pin.client, label(pin.key), pin.turns, pin.moves,
                        pin.first_seen_ms, pin.last_seen_ms, pin.input_tokens, pin.output_tokens,
                        pin.cache_read_tokens)
            for cid, pin in reversed(self._pins.items())
        ]

    def spent(self, conversation_id: str, input_tokens: int, output_tokens: int, cache_read_tokens: int) -> None:
        """A turn's answer said what it spent: added to the live conversation's (nothing
        for one already forgotten)."""
        pin = self._pins.get(conversation_id)
        if pin is not None:
            pin.input_tokens += input_tokens
            pin.output_tokens += output_tokens
            pin.cache_read_tokens += cache_read_tokens

    def expire(self, now_ms: int) -> int:
        """Drop the conversations silent for `ttl_ms` or more; returns how many."""
        before = len(self._pins)
        self._expire(now_ms)
        return before - len(self._pins)

    # -- inside ---------------------------------------------------------------------
    def _expire(self, now_ms: int) -> int:
        """Advance the table's clock (never back) and drop what expired; the time."""
        now = self._now_ms = max(now_ms, self._now_ms)
        pins = self._pins
        oldest_kept = now - self.ttl_ms
        while pins:
            cid = next(iter(pins))
            pin = pins[cid]
            if pin.last_seen_ms > oldest_kept:
                break
            del pins[cid]
            self._less(pin.key)
        return now

    def _repin(self, conversation_id: str, pin: _Pin, key: str, now: int) -> None:
        if pin.key != key:
            self._less(pin.key)
            self._live[key] = self._live.get(key, 0) + 1
            pin.key = key
        pin.last_seen_ms = now
        self._pins.move_to_end(conversation_id)

    def _less(self, key: str) -> None:
        left = self._live[key] - 1
        if left:
            self._live[key] = left
        else:
            del self._live[key]
