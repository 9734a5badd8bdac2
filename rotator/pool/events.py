"""What the pool tells whoever listens: one protocol, `PoolListener`, passed to `KeyPool`
when it is made, with a listener that hears nothing (`QUIET`), a base that ignores what a
part does not care for (`IgnoresPoolEvents`), and a fan-out to several (`PoolListeners`).

The pool touches memory only; each of these is its way to say what happened, so the
parts that act on it (the wait line, the team's caps and notices, the notifications to
a person) are told, never assigned into the pool. `rotator.proxy.assembly` builds the
pool and its listeners in one place. A listener is told synchronously, from the pool's own call: it must not
block, and it may call the pool back.
"""

from __future__ import annotations

from typing import Protocol

from rotator.core.models import Account


class PoolListener(Protocol):
    def key_freed(self) -> None:
        """A key may have freed up: an answer, a lowered deadline, a change from the store."""

    def slot_freed(self, key: str) -> None:
        """A request on `key` ended (answered, failed or never sent)."""

    def state_changed(self) -> None:
        """A key's saved state changed on an answer (cooled, disabled, back)."""

    def paused(self, pause_ms: int) -> None:
        """Every key paused this long: Kimi throttled the whole pool."""

    def limited(self, key: str) -> None:
        """A rate limit seen here and charged to `key`."""

    def key_disabled(self, index: int, account: Account, can_enable: bool) -> None:
        """The key at `index` was disabled (`account.disabled_reason` says why): a 401, a
        ban, a poll answered 401. `can_enable`: a person may put it back (not a ban)."""

    def key_enabled(self, index: int, account: Account) -> None:
        """The key at `index`, disabled before, is enabled in a state the pool adopted."""

    def window_spent(self, index: int, account: Account, window: str, resets_ms: int | None) -> None:
        """The key at `index` has no quota left in `window` (`5-hour`, `weekly`,
        `billing cycle`, ...) until `resets_ms` (None: not known): an answer naming the
        window, or a quota reading that finds it spent."""

    def adopted(self) -> None:
        """The pool took on a state: the store's, or a person's change made in place."""


class IgnoresPoolEvents:
    """A listener that hears nothing; a part overrides the events it acts on."""

    def key_freed(self) -> None:
        pass

    def slot_freed(self, key: str) -> None:
        pass

    def state_changed(self) -> None:
        pass

    def paused(self, pause_ms: int) -> None:
        pass

    def limited(self, key: str) -> None:
        pass

    def key_disabled(self, index: int, account: Account, can_enable: bool) -> None:
        pass

    def key_enabled(self, index: int, account: Account) -> None:
        pass

    def window_spent(self, index: int, account: Account, window: str, resets_ms: int | None) -> None:
        pass

    def adopted(self) -> None:
        pass


QUIET: PoolListener = IgnoresPoolEvents()


class PoolListeners:
    """Several listeners, told in the order given. Filled once, where the pool and its
    parts are built (they need the pool, so it exists first); never emptied: a part
    that stopped ignores what it hears."""

    def __init__(self, *listeners: PoolListener) -> None:
        self._listeners: list[PoolListener] = []
        # The two events of every answer go only to listeners that do something with
        # them (a listener that keeps IgnoresPoolEvents' own is not called for nothing).
        self._key_freed: list[PoolListener] = []
        self._slot_freed: list[PoolListener] = []
        self.add(*listeners)

    def add(self, *listeners: PoolListener) -> None:
        self._listeners.extend(listeners)
        self._key_freed.extend(one for one in listeners if _hears(one, "key_freed"))
        self._slot_freed.extend(one for one in listeners if _hears(one, "slot_freed"))

    def key_freed(self) -> None:
        for listener in self._key_freed:
            listener.key_freed()

    def slot_freed(self, key: str) -> None:
        for listener in self._slot_freed:
            listener.slot_freed(key)

    def state_changed(self) -> None:
        for listener in self._listeners:
            listener.state_changed()

    def paused(self, pause_ms: int) -> None:
        for listener in self._listeners:
            listener.paused(pause_ms)

    def limited(self, key: str) -> None:
        for listener in self._listeners:
            listener.limited(key)

    def key_disabled(self, index: int, account: Account, can_enable: bool) -> None:
        for listener in self._listeners:
            listener.key_disabled(index, account, can_enable)

    def key_enabled(self, index: int, account: Account) -> None:
        for listener in self._listeners:
            listener.key_enabled(index, account)

    def window_spent(self, index: int, account: Account, window: str, resets_ms: int | None) -> None:
        for listener in self._listeners:
            listener.window_spent(index, account, window, resets_ms)

    def adopted(self) -> None:
        for listener in self._listeners:
            listener.adopted()


def _hears(listener: PoolListener, event: str) -> bool:
    """Whether `listener` does anything on `event`: not IgnoresPoolEvents' own no-op."""
    return getattr(type(listener), event, None) is not getattr(IgnoresPoolEvents, event)
