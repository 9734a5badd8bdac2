"""What the running proxy reports to a person, as notify events: the pool's events (a key
disabled, enabled again, a window spent), the no-key answers of a pool that cannot serve
and the first request after, and a team store's outages.

`PoolNotifications` is one of the pool's listeners (`rotator.pool.events`) and is told by
the proxy of the rest. It turns what it hears into `rotator.notify.events` (the key
masked here, by `rotator.core.keys.mask_key`) and hands them to its `Notifier`, which
says each change once. Without URLs its notifier is inert and each call costs a check.
"""

from __future__ import annotations

from collections.abc import Sequence

from rotator.core.clock import Clock
from rotator.core.keys import mask_key
from rotator.core.models import Account
from rotator.core.strategies import Shortage, Unavailable
from rotator.notify.delivery import Notifier
from rotator.notify.events import (
    KeyDisabled,
    KeyEnabled,
    KeyRef,
    PoolCannotServe,
    PoolServes,
    StoreBack,
    StoreUnreachable,
    WindowSpent,
)
from rotator.pool.events import IgnoresPoolEvents

# The shortages a person may want to hear of: the pool itself cannot serve. A key busy
# or already tried for this request, or Kimi's short pause of every key, is traffic.
CANNOT_SERVE = frozenset({Shortage.ALL_COOLING, Shortage.ALL_DISABLED})
CLOSE_TIMEOUT_S = 5.0  # at exit: what is queued is sent for at most this long


def key_ref(index: int, account: Account) -> KeyRef:
    return KeyRef(index, account.name, mask_key(account.key))


class PoolNotifications(IgnoresPoolEvents):
    def __init__(self, clock: Clock, notifier: Notifier | None = None) -> None:
        self.clock = clock
        self.notifier = notifier if notifier is not None else Notifier(())
        self._cannot_serve = False  # said to the notifier, and no key taken since

    def use(self, notifier: Notifier) -> Notifier:
        """Send through `notifier` from now on (kimi_notify changed); returns the old one,
        for the caller to close off the event loop."""
        old, self.notifier = self.notifier, notifier
        return old

    # -- the pool's events ---------------------------------------------------------------
    def key_disabled(self, index: int, account: Account, can_enable: bool) -> None:
        if self.notifier.active:
            event = KeyDisabled(key_ref(index, account), account.disabled_reason or "", can_enable)
            self.notifier.observe(event, self.clock.now_ms())

    def key_enabled(self, index: int, account: Account) -> None:
        if self.notifier.active:
            self.notifier.observe(KeyEnabled(key_ref(index, account)), self.clock.now_ms())

    def window_spent(self, index: int, account: Account, window: str, resets_ms: int | None) -> None:
        if self.notifier.active:
            self.notifier.observe(WindowSpent(key_ref(index, account), window, resets_ms), self.clock.now_ms())

    # -- told by the proxy ---------------------------------------------------------------
    def no_key(self, why: Unavailable, accounts: Sequence[Account]) -> None:
        """A request answered without a key, for `why`."""
        if why.shortage not in CANNOT_SERVE or not self.notifier.active:
            return
        now = self.clock.now_ms()
        disabled = sum(1 for account in accounts if account.disabled_reason is not None)
        event = PoolCannotServe(why.available_at_ms, cooling=len(accounts) - disabled, disabled=disabled)
        self._cannot_serve = True
        self.notifier.observe(event, now)

    def took_key(self) -> None:
        """A request took a key (on the request path: a flag check unless the pool could
        not serve before)."""
        if self._cannot_serve:
            self._cannot_serve = False
            self.notifier.observe(PoolServes(), self.clock.now_ms())

    def store_problem(self, location: str, problem: str | None) -> None:
        """A team store's problem (`location` already masked), or None when it answers again."""
        if not self.notifier.active:
            return
        event = StoreBack(location) if problem is None else StoreUnreachable(location, problem)
        self.notifier.observe(event, self.clock.now_ms())
