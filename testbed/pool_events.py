"""A pool listener that records what the pool tells it, for in-process tests."""

from __future__ import annotations

from rotator.core.models import Account


class RecordedPoolEvents:
    """Each event the pool told, in order, as (name, *arguments)."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def named(self, name: str) -> list[tuple[object, ...]]:
        """The arguments of each event called `name`, in order."""
        return [event[1:] for event in self.events if event[0] == name]

    def key_freed(self) -> None:
        self.events.append(("key_freed",))

    def slot_freed(self, key: str) -> None:
        self.events.append(("slot_freed", key))

    def state_changed(self) -> None:
        self.events.append(("state_changed",))

    def paused(self, pause_ms: int) -> None:
        self.events.append(("paused", pause_ms))

    def limited(self, key: str) -> None:
        self.events.append(("limited", key))

    def key_disabled(self, index: int, account: Account, can_enable: bool) -> None:
        self.events.append(("key_disabled", index, account.key, can_enable))

    def key_enabled(self, index: int, account: Account) -> None:
        self.events.append(("key_enabled", index, account.key))

    def window_spent(self, index: int, account: Account, window: str, resets_ms: int | None) -> None:
        self.events.append(("window_spent", index, account.key, window, resets_ms))

    def adopted(self) -> None:
        self.events.append(("adopted",))
