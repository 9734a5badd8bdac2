"""What the key pool hears besides its own requests' answers: quota readings and Kimi's
exact reset times (rotator.proxy.polls), a poll answered 401, and the team's notices (a
key held full or freed, another proxy's rate limit, a shared pause; rotator.sync.team_caps and
rotator.sync.team_notices).

`HeardFromOutside` is a base of `KeyPool` (rotator.pool.key_pool), split off so that each class
stays readable: it works on the pool's own state, declared below, and the pool's
helpers (`account`, `_tell`, `_update_cap`, ...). Everything here touches memory only.
"""

from __future__ import annotations

from collections.abc import Callable

from rotator.core import merge, quota, throttle
from rotator.core.key_view import until_text
from rotator.core.keys import key_label
from rotator.core.models import Account
from rotator.pool import key_updates
from rotator.pool.events import PoolListener


class HeardFromOutside:
    # The pool's state these read and change (set up by KeyPool.__init__ and _adopt),
    # and the pool's helpers they call (KeyPool defines them).
    changes: merge.PoolChange
    in_flight: dict[str, int]
    paused_until_ms: int
    quota_reserve_percent: float
    listener: PoolListener
    cli: str
    _at_cap: set[str]
    _team_full: set[str]
    _parallel: dict[str, int]
    _index_by_key: dict[str, int]
    _recent_limits: throttle.RecentLimits
    account: Callable[[str], Account | None]
    _tell: Callable[[str | None], str | None]
    _update_cap: Callable[[str, int, Account], None]
    _after_slot_freed: Callable[[str, Account | None], None]
    _refund: Callable[[throttle.RecentLimit, int], None]
    _pause_for_burst: Callable[[list[throttle.RecentLimit], int], str]

    def hold_team_full(self, key: str) -> None:
        """The team holds `key` at its cap: skip it until `team_freed`."""
        self._team_full.add(key)
        self._at_cap.add(key)

    def team_freed(self, key: str) -> None:
        if key in self._team_full:
            self._team_full.discard(key)
            self._after_slot_freed(key, self.account(key))

    def pause_for(self, pause_ms: int, now_ms: int) -> None:
        """Another proxy saw Kimi throttle the team: every key here pauses too (for at
        most `throttle.PAUSE_MS`, whatever the notice asked), and the rate limits this
        pool charged to keys just before were the throttle's, not theirs: refunded."""
        self.paused_until_ms = max(self.paused_until_ms, now_ms + max(0, min(pause_ms, throttle.PAUSE_MS)))
        for limit in self._recent_limits.take_charged(now_ms):
            self._refund(limit, now_ms)

    def heard_limit(self, key: str, now_ms: int) -> str | None:
        """Another proxy saw Kimi rate limit `key` (its own to charge): counted towards a
        throttle here. Returns the pause line if it completes one."""
        if self.account(key) is None or now_ms < self.paused_until_ms:
            return None
        burst = self._recent_limits.burst(key, now_ms)
        if burst is None:
            self._recent_limits.remember(throttle.RecentLimit(now_ms, key, 0, 0, 0, charged=False))
            return None
        return self._pause_for_burst(burst, now_ms)

    def disable(self, key: str, reason: str, now_ms: int) -> str | None:
        """Disable a key outside any request (a quota poll answered 401)."""
        account = self.account(key)
        if account is None or account.disabled_reason is not None:
            return None
        index = self._index_by_key[key]
        event = key_updates.disable(account, self.changes.for_key(key), key_label(index, account.name, key), reason,
                                    now_ms, f"{self.cli} enable-key {index}")
        self.listener.key_disabled(index, account, True)
        return self._tell(event)

    def take_reading(self, key: str, reading: quota.QuotaReading, now_ms: int) -> str | None:
        """Keep a key's newest quota reading; a spent window cools the key until it resets
        (returns a log line then)."""
        account = self.account(key)
        if account is None:
            return None
        account.quota = reading
        self.changes.for_key(key).set("quota", reading, now_ms)
        self._note_parallel(key, reading)
        self._update_cap(key, self.in_flight.get(key, 0), account)
        event = self._steer(key, account, now_ms)
        self.listener.key_freed()  # a raised parallel limit frees a slot
        return self._tell(event)

    def _note_parallel(self, key: str, reading: quota.QuotaReading | None) -> None:
        if reading is not None and reading.parallel_limit is not None:
            self._parallel[key] = reading.parallel_limit
        else:
            self._parallel.pop(key, None)

    def _steer(self, key: str, account: Account, now_ms: int) -> str | None:
        spent = key_updates.spent_window(account, self.quota_reserve_percent, now_ms)
        if spent is None:
            return None
        index = self._index_by_key[key]
        event = key_updates.cooled_by_window(
            account, self.changes.for_key(key), key_label(index, account.name, key), spent, now_ms
        )
        self.listener.window_spent(index, account, spent.window.name, spent.until_ms)
        return event

    def set_exact_reset(self, key: str, deadline_ms: int, now_ms: int) -> str | None:
        """Replace a cooling key's estimated deadline with the one Kimi reported."""
        account = self.account(key)
        if account is None or account.rate_limit_reset_time <= now_ms:
            return None
        if deadline_ms == account.rate_limit_reset_time:
            return None
        account.rate_limit_reset_time = deadline_ms
        self.changes.for_key(key).set("rate_limit_reset_time", deadline_ms, now_ms)
        self.listener.key_freed()
        index = self._index_by_key[key]
        return self._tell(
            f"key {key_label(index, account.name, key)}: Kimi says its limit resets in {until_text(deadline_ms, now_ms)}"
        )
