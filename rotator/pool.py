"""The live key pool: the one object that owns the accounts' state in a running proxy.

Choosing a key, accounting for an answer and waiting for a key touch memory only. What
changed since the last save is recorded as a `merge.PoolChange`, so a save applies *our
changes* to whatever the file holds by then instead of overwriting it.
Requests that find no key wait in `rotator.waitline`, which the pool tells whenever a
key may have freed up (`key_freed`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from rotator import merge, oddities, quota, stats, throttle
from rotator.clock import SYSTEM_CLOCK, Clock, seconds_until
from rotator.health import HEALTH_MAX, apply_health_delta, rest_period_ms
from rotator.lease import Lease, SkipKeys
from rotator.models import Account, AccountsFile
from rotator.policy import Outcome, Verdict
from rotator.status import key_label
from rotator.strategies import Shortage, Unavailable, choose_key, next_index

__all__ = ["KeyPool", "Lease"]  # Lease lives in rotator.lease; callers know it from here

DEFAULT_MAX_IN_FLIGHT = 30
# Cooldowns that follow each other with no success between them grow: ×2 each time,
# up to this cap. Plan windows and disabled keys have their own deadlines and don't.
MAX_BACKOFF_MS = 30 * 60 * 1000
BACKOFF_VERDICTS = frozenset({Verdict.RATE_LIMITED, Verdict.CONCURRENCY_LIMIT, Verdict.ACCESS_DENIED})


def _nobody_waits() -> None:
    pass


class KeyPool:
    def __init__(
        self, state: AccountsFile, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.max_in_flight = max_in_flight
        # A window with at most this percent of its limit left counts as spent (rotator.quota).
        self.quota_reserve_percent = quota.DEFAULT_RESERVE_PERCENT
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        # Kimi's parallel limit per key, where a quota reading gave one (caps in-flight).
        self._parallel: dict[str, int] = {}
        self._at_cap: set[str] = set()
        # Keys the team holds at their cap (rotator.teamcaps), skipped until one frees.
        self._team_full: set[str] = set()
        # What a team hears of (rotator.teamcaps, rotator.teamnotices): a request on a key
        # ended; a key's state changed (the event lines below); every key paused this long
        # for a throttle; a rate limit seen here and charged to its key.
        self.slot_freed: Callable[[str], None] | None = None
        self.state_changed: Callable[[], None] | None = None
        self.paused: Callable[[int], None] | None = None
        self.limited: Callable[[str], None] | None = None
        self.changes = merge.PoolChange()
        self.paused_until_ms = 0
        self._recent_limits = throttle.RecentLimits()
        # Called whenever a key may have freed up: an answer, a lowered deadline, a
        # change from the store. The wait line sets it.
        self.key_freed: Callable[[], None] = _nobody_waits
        self._adopt(state)

    # -- reading ---------------------------------------------------------------
    @property
    def state(self) -> AccountsFile:
        return self._state

    @property
    def accounts(self) -> list[Account]:
        return self._state.accounts

    @property
    def has_busy_keys(self) -> bool:
        """Whether a key is held back only by its in-flight cap (it frees on an answer)."""
        return bool(self._at_cap)

    def account(self, key: str) -> Account | None:
        index = self._index_by_key.get(key)
        return None if index is None else self._state.accounts[index]

    def peek(self, now_ms: int, tried: Collection[str] = ()) -> int | Unavailable:
        """The index `acquire` would choose, changing nothing."""
        if now_ms < self.paused_until_ms and self._state.accounts:
            return Unavailable(Shortage.THROTTLED, self.paused_until_ms)
        state = self._state
        excluded = self._at_cap.union(tried) if tried else self._at_cap
        skip = SkipKeys(state.accounts, excluded) if excluded else ()
        return choose_key(
            state.accounts, state.rotation_strategy, state.active_index, now_ms, skip, self._rest_ms
        )

    # -- the hot path ------------------------------------------------------------
    def acquire(self, now_ms: int, tried: Collection[str] = ()) -> Lease | Unavailable:
        """Choose a key for one attempt and count the attempt on it."""
        chosen = self.peek(now_ms, tried)
        if isinstance(chosen, Unavailable):
            return chosen
        state = self._state
        account = state.accounts[chosen]
        key = account.key
        new_active = next_index(chosen, len(state.accounts), state.rotation_strategy)
        if new_active != state.active_index:
            state.active_index = new_active
            self.changes.move_active(state.accounts[new_active].key, now_ms)
        account.total_requests += 1
        account.last_used = now_ms
        change = self.changes.for_key(key)
        change.add("total_requests", 1, now_ms)
        change.later("last_used", now_ms, now_ms)
        busy = self.in_flight.get(key, 0) + 1
        self.in_flight[key] = busy
        self._update_cap(key, busy, account)
        return Lease(key, chosen, account.name, now_ms)

    def acquire_preferring_untried(self, now_ms: int, tried: Collection[str]) -> Lease | Unavailable:
        """A key not yet tried for this request, else a tried one that can serve again
        (its cooldown over, or the shared pause ended)."""
        lease = self.acquire(now_ms, tried)
        if tried and not isinstance(lease, Lease):
            lease = self.acquire(now_ms)
        return lease

    def release(self, lease: Lease, outcome: Outcome, now_ms: int, took_ms: int | None = None) -> str | None:
        """Account for an attempt's outcome (`took_ms`: a success's response time);
        returns a log line if the key's state changed."""
        self._free_slot(lease.key)
        account = self.account(lease.key)
        event = None if account is None else self._account_outcome(lease, account, outcome, now_ms, took_ms)
        self._after_slot_freed(lease.key, account)
        return self._tell(event)

    def abandon(self, lease: Lease) -> None:
        """An attempt that was never sent (its client left first): as if never chosen."""
        self._free_slot(lease.key)
        account = self.account(lease.key)
        if account is not None and account.total_requests > 0:
            account.total_requests -= 1
            self.changes.for_key(lease.key).add("total_requests", -1, self.clock.now_ms())
        self._after_slot_freed(lease.key, account)

    def _free_slot(self, key: str) -> None:
        busy = self.in_flight.get(key, 1) - 1
        if busy > 0:
            self.in_flight[key] = busy
        else:
            self.in_flight.pop(key, None)
        if self.slot_freed is not None:
            self.slot_freed(key)

    def _after_slot_freed(self, key: str, account: Account | None) -> None:
        if account is None:
            self._at_cap.discard(key)  # removed while the request was in flight
        else:
            self._update_cap(key, self.in_flight.get(key, 0), account)
        self.key_freed()

    def cap(self, key: str) -> int:
        """Requests `key` may have in flight: the proxy's cap, or Kimi's parallel limit if lower."""
        limit = self._parallel.get(key)
        return self.max_in_flight if limit is None or limit > self.max_in_flight else limit

    def team_cap(self, key: str) -> int:
        """The cap a key's slots have across the team: one while half-open."""
        account = self.account(key)
        return 1 if account is not None and account.cooldown_level else self.cap(key)

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

    def _pause_for_burst(self, burst: list[throttle.RecentLimit], now_ms: int) -> str:
        self.paused_until_ms = now_ms + throttle.PAUSE_MS
        if self.paused is not None:
            self.paused(throttle.PAUSE_MS)
        for limit in burst:
            if limit.charged:
                self._refund(limit, now_ms)
        return throttle.pause_line(burst)

    def _update_cap(self, key: str, busy: int, account: Account) -> None:
        """A key at its in-flight cap is not chosen. A key back from a cooldown
        (half-open) has a cap of one until a request on it succeeds."""
        if busy >= self.max_in_flight or (busy and account.cooldown_level) or (
            self._parallel and busy >= self.cap(key)
        ) or key in self._team_full:
            self._at_cap.add(key)
        else:
            self._at_cap.discard(key)

    def _account_outcome(
        self, lease: Lease, account: Account, outcome: Outcome, now_ms: int, took_ms: int | None
    ) -> str | None:
        if outcome.verdict is Verdict.RATE_LIMITED:
            if now_ms < self.paused_until_ms:
                return None  # the shared pause is on: not the key's fault
            burst = self._recent_limits.burst(lease.key, now_ms)
            if burst is not None:
                return self._pause_for_burst(burst, now_ms)
            self._recent_limits.remember(throttle.RecentLimit(
                now_ms, lease.key, account.rate_limit_reset_time, account.cooldown_level, account.health_score
            ))
            if self.limited is not None:
                self.limited(lease.key)
        change = self.changes.for_key(lease.key)
        was_cooling = account.rate_limit_reset_time > now_ms or account.billing_limit_reset_time > now_ms
        delta = outcome.health_delta
        if delta < 0 or (delta > 0 and account.health_score < HEALTH_MAX):
            self._add_health(account, change, delta, now_ms)
        event: str | None = None
        if outcome.counts_as_success:
            if stats.record_success(account, change, took_ms, now_ms):
                event = f"key {lease.label} recovered: back to full traffic"
        elif outcome.health_delta < 0:
            account.consecutive_failures += 1
            change.set("consecutive_failures", account.consecutive_failures, now_ms)
        if outcome.disable and account.disabled_reason is None:
            event = self._disable(lease.label, account, change, outcome.reason, now_ms)
        deadline = outcome.cooldown_until_ms
        if deadline is not None:
            level = account.cooldown_level
            # Requests already in flight when the key first cooled are the same episode:
            # only a refusal after the cooldown ended (the half-open probe) grows it.
            if outcome.verdict in BACKOFF_VERDICTS and not was_cooling:
                if level:
                    deadline = now_ms + min(MAX_BACKOFF_MS, max(0, deadline - now_ms) << level)
                account.cooldown_level = level + 1
                change.set("cooldown_level", level + 1, now_ms)
            if deadline > account.rate_limit_reset_time:
                account.rate_limit_reset_time = deadline
                change.later("rate_limit_reset_time", deadline, now_ms)
                account.cooldown_reason = outcome.reason
                change.set("cooldown_reason", outcome.reason, now_ms)
                if not was_cooling:
                    seconds = seconds_until(deadline, now_ms)
                    event = f"key {lease.label} cooling for {seconds} s: {outcome.reason}"
        return event

    def _disable(self, label: str, account: Account, change: merge.KeyChange, reason: str, now_ms: int) -> str:
        account.disabled_reason = reason
        change.set("disabled_reason", reason, now_ms)
        return f"key {label} disabled: {reason}; run `kimi-rotator enable-key` to use it again"

    def disable(self, key: str, reason: str, now_ms: int) -> str | None:
        """Disable a key outside any request (a quota poll answered 401)."""
        account = self.account(key)
        if account is None or account.disabled_reason is not None:
            return None
        label = key_label(self._index_by_key[key], account.name, key)
        return self._tell(self._disable(label, account, self.changes.for_key(key), reason, now_ms))

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
        self.key_freed()  # a raised parallel limit frees a slot
        return self._tell(event)

    def _note_parallel(self, key: str, reading: quota.QuotaReading | None) -> None:
        if reading is not None and reading.parallel_limit is not None:
            self._parallel[key] = reading.parallel_limit
        else:
            self._parallel.pop(key, None)

    def _steer(self, key: str, account: Account, now_ms: int) -> str | None:
        """Cool a key whose reading shows a spent window, unless a person cleared its
        cooldown after the reading was taken (they may know better: a topped-up plan)."""
        reading = account.quota
        spent = quota.steer(reading, self.quota_reserve_percent, now_ms)
        if spent is None or reading is None or spent.until_ms <= account.rate_limit_reset_time:
            return None
        cleared_at = account.edited_at.get(merge.disk_name("rate_limit_reset_time"), 0)
        if cleared_at > reading.taken_at:
            return None
        was_cooling = account.cooling_until > now_ms
        change = self.changes.for_key(key)
        account.rate_limit_reset_time = spent.until_ms
        change.later("rate_limit_reset_time", spent.until_ms, now_ms)
        account.cooldown_reason = spent.reason
        change.set("cooldown_reason", spent.reason, now_ms)
        if was_cooling:
            return None
        label = key_label(self._index_by_key[key], account.name, key)
        return f"key {label} cooling for {seconds_until(spent.until_ms, now_ms)} s: {spent.reason}"

    def set_exact_reset(self, key: str, deadline_ms: int, now_ms: int) -> str | None:
        """Replace a cooling key's estimated deadline with the one Kimi reported."""
        account = self.account(key)
        if account is None or account.rate_limit_reset_time <= now_ms:
            return None
        if deadline_ms == account.rate_limit_reset_time:
            return None
        account.rate_limit_reset_time = deadline_ms
        self.changes.for_key(key).set("rate_limit_reset_time", deadline_ms, now_ms)
        self.key_freed()
        seconds = seconds_until(deadline_ms, now_ms)
        index = self._index_by_key[key]
        return self._tell(f"key {key_label(index, account.name, key)}: Kimi says its limit resets in {seconds} s")

    def _tell(self, event: str | None) -> str | None:
        if event is not None and self.state_changed is not None:
            self.state_changed()
        return event

    def _add_health(self, account: Account, change: merge.KeyChange, delta: int, now_ms: int) -> None:
        new = apply_health_delta(account, delta, now_ms, self._rest_ms)
        change.add("health_score", new.score - account.health_score, now_ms)
        account.health_score = new.score
        account.health_rest_since = new.rest_since
        change.set("health_rest_since", new.rest_since, now_ms)

    def _refund(self, limit: throttle.RecentLimit, now_ms: int) -> None:
        account = self.account(limit.key)
        if account is None:
            return
        change = self.changes.for_key(limit.key)
        account.rate_limit_reset_time = limit.previous_deadline
        change.set("rate_limit_reset_time", limit.previous_deadline, now_ms)
        account.cooldown_level = limit.previous_level
        change.set("cooldown_level", limit.previous_level, now_ms)
        refund = limit.previous_health - account.health_score
        if refund > 0:
            self._add_health(account, change, refund, now_ms)
        if account.consecutive_failures:
            account.consecutive_failures -= 1
            change.set("consecutive_failures", account.consecutive_failures, now_ms)

    # -- persistence -------------------------------------------------------------
    def take_changes(self) -> merge.PoolChange:
        """Hand over the changes to save; newer ones collect in a fresh record."""
        taken, self.changes = self.changes, merge.PoolChange()
        return taken

    def give_back(self, taken: merge.PoolChange) -> None:
        """A save failed: keep its changes for the next one."""
        taken.absorb(self.changes)
        self.changes = taken

    def adopt(self, on_disk: AccountsFile) -> list[str]:
        """Take the file's state as the new base, with changes since the save on top;
        returns log lines for keys a quota reading from the file cooled."""
        merge.apply(on_disk, self.changes)
        events = self._adopt(on_disk)
        self.key_freed()
        return events

    def _adopt(self, state: AccountsFile) -> list[str]:
        self._state = state = oddities.in_use(state)  # a key listed twice: its first entry
        self._index_by_key = oddities.first_index_by_key(state.accounts)
        self._rest_ms = rest_period_ms(state)
        self._parallel = {}
        events = []
        now_ms = self.clock.now_ms()
        for key, index in self._index_by_key.items():
            account = state.accounts[index]
            if account.quota is not None:  # another process's reading (the CLI's `usage`)
                self._note_parallel(key, account.quota)
                event = self._steer(key, account, now_ms)
                if event:
                    events.append(event)
        self._team_full &= self._index_by_key.keys()
        self._at_cap = set(self._team_full)
        for key, busy in self.in_flight.items():
            account = self.account(key)
            if account is not None:
                self._update_cap(key, busy, account)
        return events
