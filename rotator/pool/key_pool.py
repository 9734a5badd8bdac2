"""The live key pool: the one object that owns the accounts' state in a running proxy.

Choosing a key, accounting for an answer and waiting for a key touch memory only. What
changed since the last save is recorded as a `merge.PoolChange`, so a save applies *our
changes* to whatever the file holds by then instead of overwriting it.
What happens to the pool is told to the one listener it is given (`rotator.pool.events`):
requests that find no key wait in `rotator.pool.waitline`, which hears whenever a key may
have freed up (`key_freed`); a team's parts hear of slots, changes, pauses and limits.
What an answer does to a key's saved state is in
`rotator.pool.key_updates`; what the pool hears besides answers (quota readings, the team's
notices) in its base class, `rotator.pool.from_outside`.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

from rotator.core import merge, oddities, quota, throttle
from rotator.core.clock import SYSTEM_CLOCK, Clock
from rotator.core.health import rest_period_ms
from rotator.core.models import Account, AccountsFile
from rotator.core.policy import Outcome, Verdict, Window
from rotator.core.strategies import Shortage, Unavailable, choose_key, is_usable, next_index
from rotator.pool import key_updates
from rotator.pool.events import QUIET, PoolListener
from rotator.pool.from_outside import HeardFromOutside
from rotator.pool.lease import Lease, SkipKeys, new_lease
from rotator.tokens import Usage

# Read on every answer: a module-level name is cheaper than a member looked up on its class.
_RATE_LIMITED, _ACCOUNT_BANNED = Verdict.RATE_LIMITED, Verdict.ACCOUNT_BANNED
# The Account fields taking a key writes.
_TAKE_WRITES = ("total_requests", "last_used")


DEFAULT_MAX_IN_FLIGHT = 30
# A window an answer names, as a person reads it (`rotator.core.quota.window_name`'s words).
WINDOW_NAMES = {Window.FIVE_HOUR: "5-hour", Window.WEEKLY: "weekly", Window.BILLING_CYCLE: "billing cycle"}


class KeyPool(HeardFromOutside):
    def __init__(
        self,
        state: AccountsFile,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        clock: Clock = SYSTEM_CLOCK,
        listener: PoolListener = QUIET,
    ) -> None:
        # Told what happens here (rotator.pool.events): a request on a key ended, a key
        # may have freed up, a key's state changed, every key paused, a rate limit charged.
        self.listener = listener
        # The CLI command a message advises, naming the store (rotator.store.cli_command).
        self.cli = "kimi-rotator"
        self.max_in_flight = max_in_flight
        # A window with at most this percent of its limit left counts as spent (rotator.core.quota).
        self.quota_reserve_percent = quota.DEFAULT_RESERVE_PERCENT
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        # Kimi's parallel limit per key, where a quota reading gave one (caps in-flight).
        self._parallel: dict[str, int] = {}
        self._at_cap: set[str] = set()
        # Keys the team holds at their cap (rotator.sync.team_caps), skipped until one frees.
        self._team_full: set[str] = set()
        self.changes = merge.PoolChange()
        # This proxy's name in a team (`kimi_member`): tokens are counted per member too.
        self.member: str | None = None
        self.paused_until_ms = 0
        self._recent_limits = throttle.RecentLimits()
        # Each key's entry, as (its addedAt, a number given when the pool first saw it):
        # a lease names the entry it was taken from (see `_entries_of`).
        self._entries: dict[str, tuple[int, int]] = {}
        self._entry_numbers = itertools.count(1)
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
        return self._take(chosen, now_ms)

    def can_serve(self, key: str, now_ms: int, tried: Collection[str] = ()) -> bool:
        """Whether `key` could take a request now: listed, usable (not disabled, not
        cooling, which a quota spent per /usages also makes it), not at its own or the
        team's cap, not in `tried`, and no shared pause on."""
        index = self._index_by_key.get(key)
        return (
            index is not None
            and now_ms >= self.paused_until_ms
            and key not in self._at_cap
            and key not in tried
            and is_usable(self._state.accounts[index], now_ms)
        )

    def acquire_key(self, key: str, now_ms: int, tried: Collection[str] = ()) -> Lease | None:
        """`key` itself for one attempt, counted as `acquire` counts it, if it can serve
        now (`can_serve`); None otherwise, changing nothing."""
        if not self.can_serve(key, now_ms, tried):
            return None
        return self._take(self._index_by_key[key], now_ms)

    def _take(self, chosen: int, now_ms: int) -> Lease:
        state = self._state
        account = state.accounts[chosen]
        key = account.key
        new_active = next_index(chosen, len(state.accounts), state.rotation_strategy)
        if new_active != state.active_index:
            state.active_index = new_active
            self.changes.move_active(state.accounts[new_active].key, now_ms)
        # Written as pydantic's __setattr__ would (Account does not validate assignment:
        # tests/test_pool pins that), without its two Python calls a field per request.
        fields = account.__dict__
        fields["total_requests"] += 1
        fields["last_used"] = now_ms
        account.__pydantic_fields_set__.update(_TAKE_WRITES)
        change = self.changes.for_key(key)
        change.add("total_requests", 1, now_ms)
        change.later("last_used", now_ms, now_ms)
        busy = self.in_flight.get(key, 0) + 1
        self.in_flight[key] = busy
        self._update_cap(key, busy, account)
        return new_lease((key, chosen, account.name, now_ms, self._entries[key][1]))

    def acquire_preferring_untried(self, now_ms: int, tried: Collection[str]) -> Lease | Unavailable:
        """A key not yet tried for this request, else a tried one that can serve again
        (its cooldown over, or the shared pause ended)."""
        lease = self.acquire(now_ms, tried)
        if tried and not isinstance(lease, Lease):
            lease = self.acquire(now_ms)
        return lease

    def release(
        self, lease: Lease, outcome: Outcome, now_ms: int, took_ms: int | None = None, usage: Usage | None = None
    ) -> str | None:
        """Account for an attempt's outcome (`took_ms`: a success's response time) and the
        tokens its answer spent (`usage`, counted on the key's entry the lease was taken
        from); returns a log line if the key's state changed."""
        key = lease.key
        self._free_slot(key)
        account = self.account(key)
        counted = self._taken_from(lease, account)
        event = None
        if counted is not None:
            if usage is not None:
                key_updates.spent(counted, self.changes.for_key(key), usage, now_ms, self.member)
            event = self._account_outcome(lease, counted, outcome, now_ms, took_ms)
        self._after_slot_freed(key, account)
        return self._tell(event)

    def abandon(self, lease: Lease) -> None:
        """An attempt that was never sent (its client left first): as if never chosen."""
        self._free_slot(lease.key)
        account = self.account(lease.key)
        counted = self._taken_from(lease, account)
        if counted is not None and counted.total_requests > 0:
            counted.total_requests -= 1
            self.changes.for_key(lease.key).add("total_requests", -1, self.clock.now_ms())
        self._after_slot_freed(lease.key, account)

    def _taken_from(self, lease: Lease, account: Account | None) -> Account | None:
        """The account `lease` counts on: its key's entry if it is still the one the lease
        was taken from, else none (removed, and maybe added again as a new entry; the
        slot is the key's all the same: Kimi sees one key)."""
        if account is None:
            return None
        entry = self._entries.get(lease.key)
        return account if entry is not None and entry[1] == lease.entry else None

    def _free_slot(self, key: str) -> None:
        busy = self.in_flight.get(key, 1) - 1
        if busy > 0:
            self.in_flight[key] = busy
        else:
            self.in_flight.pop(key, None)
        self.listener.slot_freed(key)

    def _after_slot_freed(self, key: str, account: Account | None) -> None:
        if account is None:
            self._at_cap.discard(key)  # removed while the request was in flight
        else:
            self._update_cap(key, self.in_flight.get(key, 0), account)
        self.listener.key_freed()

    def cap(self, key: str) -> int:
        """Requests `key` may have in flight: the proxy's cap, or Kimi's parallel limit if lower."""
        limit = self._parallel.get(key)
        return self.max_in_flight if limit is None or limit > self.max_in_flight else limit

    def team_cap(self, key: str) -> int:
        """The cap a key's slots have across the team: one while half-open."""
        account = self.account(key)
        return 1 if account is not None and account.cooldown_level else self.cap(key)

    def _pause_for_burst(self, burst: list[throttle.RecentLimit], now_ms: int) -> str:
        self.paused_until_ms = now_ms + throttle.PAUSE_MS
        self.listener.paused(throttle.PAUSE_MS)
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
        if outcome.verdict is _RATE_LIMITED:
            if now_ms < self.paused_until_ms:
                return None  # the shared pause is on: not the key's fault
            burst = self._recent_limits.burst(lease.key, now_ms)
            if burst is not None:
                return self._pause_for_burst(burst, now_ms)
            self._recent_limits.remember(throttle.RecentLimit(
                now_ms, lease.key, account.rate_limit_reset_time, account.cooldown_level, account.health_score
            ))
            self.listener.limited(lease.key)
        change = self.changes.for_key(lease.key)
        was_disabled = account.disabled_reason is not None
        can_enable = outcome.verdict is not _ACCOUNT_BANNED
        # The command that puts the key back, for a key this answer disables (only then).
        hint = f"{self.cli} enable-key {self._index_by_key[lease.key]}" if can_enable and outcome.disable else None
        event = key_updates.apply_answer(account, change, lease.label, outcome, now_ms, took_ms, self._rest_ms, hint)
        if outcome.disable and not was_disabled and account.disabled_reason is not None:
            self.listener.key_disabled(self._index_by_key[lease.key], account, can_enable)
        elif outcome.window is not None:
            window = WINDOW_NAMES[outcome.window]
            self.listener.window_spent(self._index_by_key[lease.key], account, window, account.cooling_until or None)
        return event

    def _tell(self, event: str | None) -> str | None:
        if event is not None:
            self.listener.state_changed()
        return event

    def _refund(self, limit: throttle.RecentLimit, now_ms: int) -> None:
        account = self.account(limit.key)
        if account is not None:
            key_updates.refunded(account, self.changes.for_key(limit.key), limit, now_ms, self._rest_ms)

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
        returns log lines for keys a quota reading from the file cooled. Changes made on
        an entry the file no longer has (removed, or replaced by a new entry of the same
        key) are dropped: they were that entry's, and it is gone."""
        self._drop_changes_of_gone_entries(on_disk)
        merge.apply(on_disk, self.changes)
        events = self._adopt(on_disk)
        self.listener.adopted()
        self.listener.key_freed()
        return events

    def _drop_changes_of_gone_entries(self, on_disk: AccountsFile) -> None:
        changed = self.changes.keys
        if not changed:
            return
        added_at = {account.key: account.added_at for account in reversed(on_disk.accounts)}  # first entries
        for key in list(changed):
            entry = self._entries.get(key)
            if entry is None or added_at.get(key) != entry[0]:
                del changed[key]

    def _entries_of(self, state: AccountsFile) -> dict[str, tuple[int, int]]:
        """Each key's entry in `state`: the one the pool knew while the key stays listed
        with the same addedAt; a new one for a key that was not listed when last
        adopted, or whose addedAt changed (removed and added again between two reads)."""
        known = self._entries
        entries: dict[str, tuple[int, int]] = {}
        for key, index in self._index_by_key.items():
            added_at = state.accounts[index].added_at
            entry = known.get(key)
            entries[key] = entry if entry is not None and entry[0] == added_at else (added_at, next(self._entry_numbers))
        return entries

    def _adopt(self, state: AccountsFile) -> list[str]:
        was_disabled = {a.key for a in self._state.accounts if a.disabled_reason is not None} if self._entries else ()
        self._state = state = oddities.in_use(state)  # a key listed twice: its first entry
        self._index_by_key = oddities.first_index_by_key(state.accounts)
        self._entries = self._entries_of(state)
        self._rest_ms = rest_period_ms(state)
        self._parallel = {}
        events = []
        now_ms = self.clock.now_ms()
        for key, index in self._index_by_key.items():
            account = state.accounts[index]
            if key in was_disabled and account.disabled_reason is None:  # enabled again
                self.listener.key_enabled(index, account)
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
