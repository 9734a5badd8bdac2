"""The live key pool: the one object that owns the accounts' state in a running proxy.

Choosing a key and accounting for a response touch memory only. What changed since the
last flush is kept as a `PendingChange` per key, so a flush can apply *our changes* to
whatever is on disk now (keys added or removed by the CLI, another proxy's counts)
instead of overwriting it: counters add up, deadlines keep the later one, and
manual choices (keys, names, order, strategy, `use-key`) come from the file.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

from rotator.health import HEALTH_MAX, apply_health_delta, clamp_health
from rotator.keys import mask_key
from rotator.models import Account, AccountsFile
from rotator.policy import Outcome, Verdict
from rotator.reset_times import seconds_until
from rotator.strategies import Shortage, Unavailable, choose_key, next_index

DEFAULT_MAX_IN_FLIGHT = 30
# Cooldowns that follow each other with no success between them grow: ×2 each time,
# up to this cap. Plan windows and disabled keys have their own deadlines and don't.
MAX_BACKOFF_MS = 30 * 60 * 1000
BACKOFF_VERDICTS = frozenset({Verdict.RATE_LIMITED, Verdict.CONCURRENCY_LIMIT, Verdict.ACCESS_DENIED})
# Rate limits on this many different keys within the window look like Kimi throttling
# this client (IP or account-wide), not like each key's fault: one shared pause instead.
GLOBAL_THROTTLE_KEYS = 3
GLOBAL_THROTTLE_WINDOW_MS = 5_000
GLOBAL_PAUSE_MS = 10_000


@dataclass(slots=True)
class PendingChange:
    """One key's changes since the last flush, in a form that merges with the file's."""

    requests: int = 0
    successes: int = 0
    health_delta: int = 0
    last_used: int = 0
    rate_limit_reset_time: int = 0
    # Set when we lowered the deadline on purpose (exact reset learnt, throttle refund):
    # then our deadline replaces the file's instead of the later one winning.
    reset_lowered: bool = False
    # Last-writer-wins fields; None means "not changed by us".
    consecutive_failures: int | None = None
    health_rest_since: int | None = None
    disabled_reason: str | None = None
    cooldown_reason: str | None = None
    cooldown_level: int | None = None


_LAST_WRITER_WINS = (
    "consecutive_failures", "health_rest_since", "disabled_reason", "cooldown_reason", "cooldown_level",
)


@dataclass(slots=True)
class Pending:
    changes: dict[str, PendingChange] = field(default_factory=dict)
    # The key we moved the active index to, if we moved it.
    active_key: str | None = None

    def __bool__(self) -> bool:
        return bool(self.changes) or self.active_key is not None

    def for_key(self, key: str) -> PendingChange:
        change = self.changes.get(key)
        if change is None:
            change = self.changes[key] = PendingChange()
        return change

    def absorb(self, later: Pending) -> None:
        """Fold `later` into this one, as if both had happened in order."""
        for key, new in later.changes.items():
            old = self.for_key(key)
            old.requests += new.requests
            old.successes += new.successes
            old.health_delta += new.health_delta
            old.last_used = max(old.last_used, new.last_used)
            if new.reset_lowered:
                old.rate_limit_reset_time, old.reset_lowered = new.rate_limit_reset_time, True
            else:
                old.rate_limit_reset_time = max(old.rate_limit_reset_time, new.rate_limit_reset_time)
            for name in _LAST_WRITER_WINS:
                value = getattr(new, name)
                if value is not None:
                    setattr(old, name, value)
        if later.active_key is not None:
            self.active_key = later.active_key


def apply_pending(state: AccountsFile, pending: Pending, base_active_key: str | None) -> AccountsFile:
    """Apply our changes to `state` (mutated and returned): the merge rule in one place.

    Keys that `state` no longer has were removed by someone else and stay removed. The
    active index moves to our choice only if nobody moved it since we last saw the file.
    """
    for account in state.accounts:
        change = pending.changes.get(account.key)
        if change is not None:
            _apply_change(account, change)
    if pending.active_key is not None and state.active_key() == base_active_key:
        index = state.index_of(pending.active_key)
        if index is not None:
            state.active_index = index
    return state


def _apply_change(account: Account, change: PendingChange) -> None:
    account.total_requests += change.requests
    account.successful_requests += change.successes
    account.health_score = clamp_health(account.health_score + change.health_delta)
    account.last_used = max(account.last_used, change.last_used)
    if change.reset_lowered:
        account.rate_limit_reset_time = change.rate_limit_reset_time
    else:
        account.rate_limit_reset_time = max(account.rate_limit_reset_time, change.rate_limit_reset_time)
    for name in _LAST_WRITER_WINS:
        value = getattr(change, name)
        if value is not None:
            setattr(account, name, value)


class Lease(NamedTuple):
    """One attempt's hold on a key, from choice to outcome (made once per request:
    a NamedTuple is the cheapest immutable record)."""

    key: str
    index: int
    name: str

    @property
    def masked_key(self) -> str:
        return mask_key(self.key)

    @property
    def label(self) -> str:
        return f"[{self.index}] {self.name or 'unnamed'} ({self.masked_key})"


class _SkipKeys:
    """`index in skip` for choose_key, answered from a set of keys."""

    __slots__ = ("accounts", "keys")

    def __init__(self, accounts: list[Account], keys: Collection[str]) -> None:
        self.accounts = accounts
        self.keys = keys

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self.accounts[index].key in self.keys


@dataclass(frozen=True, slots=True)
class _RecentLimit:
    """A rate limit we charged to a key, kept briefly in case it was a global throttle."""

    at_ms: int
    key: str
    previous_deadline: int
    previous_level: int
    previous_health: int


class KeyPool:
    def __init__(self, state: AccountsFile, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight: dict[str, int] = {}
        self._at_cap: set[str] = set()
        self.pending = Pending()
        self.paused_until_ms = 0
        self._recent_limits: list[_RecentLimit] = []
        self._adopt(state)

    # -- reading ---------------------------------------------------------------
    @property
    def state(self) -> AccountsFile:
        return self._state

    @property
    def accounts(self) -> list[Account]:
        return self._state.accounts

    def account(self, key: str) -> Account | None:
        index = self._index_by_key.get(key)
        return None if index is None else self._state.accounts[index]

    def peek(self, now_ms: int, tried: Collection[str] = ()) -> int | Unavailable:
        """The index `acquire` would choose, changing nothing."""
        if now_ms < self.paused_until_ms and self._state.accounts:
            return Unavailable(Shortage.THROTTLED, self.paused_until_ms)
        state = self._state
        excluded = self._at_cap.union(tried) if tried else self._at_cap
        skip = _SkipKeys(state.accounts, excluded) if excluded else ()
        return choose_key(state.accounts, state.rotation_strategy, state.active_index, now_ms, skip)

    def is_busy(self, tried: Collection[str] = ()) -> bool:
        """Whether some key not yet tried is only held back by its in-flight cap."""
        return any(key not in tried for key in self._at_cap)

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
            self.pending.active_key = state.accounts[new_active].key
        account.total_requests += 1
        account.last_used = now_ms
        change = self.pending.for_key(key)
        change.requests += 1
        change.last_used = now_ms
        busy = self.in_flight.get(key, 0) + 1
        self.in_flight[key] = busy
        self._update_cap(key, busy, account)
        return Lease(key, chosen, account.name)

    def release(self, lease: Lease, outcome: Outcome, now_ms: int) -> str | None:
        """Account for an attempt's outcome; returns a log line if the key's state changed."""
        busy = self.in_flight.get(lease.key, 1) - 1
        if busy > 0:
            self.in_flight[lease.key] = busy
        else:
            self.in_flight.pop(lease.key, None)
        account = self.account(lease.key)
        if account is None:
            self._at_cap.discard(lease.key)
            return None  # removed while the request was in flight
        event = self._account_outcome(lease, account, outcome, now_ms)
        self._update_cap(lease.key, busy, account)
        return event

    def _update_cap(self, key: str, busy: int, account: Account) -> None:
        """A key at its in-flight cap is not chosen. A key back from a cooldown
        (half-open) has a cap of one until a request on it succeeds."""
        if busy >= self.max_in_flight or (busy and account.cooldown_level):
            self._at_cap.add(key)
        else:
            self._at_cap.discard(key)

    def _account_outcome(self, lease: Lease, account: Account, outcome: Outcome, now_ms: int) -> str | None:
        if outcome.verdict is Verdict.RATE_LIMITED:
            throttle = self._detect_throttle(lease.key, now_ms)
            if throttle is not None:
                return throttle or None
            self._recent_limits.append(
                _RecentLimit(now_ms, lease.key, account.rate_limit_reset_time, account.cooldown_level,
                             account.health_score)
            )
        change = self.pending.for_key(lease.key)
        was_cooling = account.rate_limit_reset_time > now_ms
        delta = outcome.health_delta
        if delta < 0 or (delta > 0 and account.health_score < HEALTH_MAX):
            self._add_health(account, change, delta, now_ms)
        event: str | None = None
        if outcome.counts_as_success:
            account.successful_requests += 1
            change.successes += 1
            change.consecutive_failures = 0
            if account.consecutive_failures:
                account.consecutive_failures = 0
            if account.cooldown_level:
                account.cooldown_level = change.cooldown_level = 0
                event = f"key {lease.label} recovered: back to full traffic"
        elif outcome.health_delta < 0:
            account.consecutive_failures += 1
            change.consecutive_failures = account.consecutive_failures
        if outcome.disable and account.disabled_reason is None:
            account.disabled_reason = change.disabled_reason = outcome.reason
            event = f"key {lease.label} disabled: {outcome.reason}; run `kimi-rotator enable-key` to use it again"
        deadline = outcome.cooldown_until_ms
        if deadline is not None:
            level = account.cooldown_level
            # Requests already in flight when the key first cooled are the same episode:
            # only a refusal after the cooldown ended (the half-open probe) grows it.
            if outcome.verdict in BACKOFF_VERDICTS and not was_cooling:
                if level:
                    deadline = now_ms + min(MAX_BACKOFF_MS, max(0, deadline - now_ms) << level)
                account.cooldown_level = change.cooldown_level = level + 1
            if deadline > account.rate_limit_reset_time:
                account.rate_limit_reset_time = deadline
                change.rate_limit_reset_time = max(change.rate_limit_reset_time, deadline)
                account.cooldown_reason = change.cooldown_reason = outcome.reason
                if not was_cooling:
                    seconds = seconds_until(deadline, now_ms)
                    event = f"key {lease.label} cooling for {seconds} s: {outcome.reason}"
        return event

    def set_exact_reset(self, key: str, deadline_ms: int, now_ms: int) -> str | None:
        """Replace a cooling key's estimated deadline with the one Kimi reported."""
        account = self.account(key)
        if account is None or account.rate_limit_reset_time <= now_ms:
            return None
        if deadline_ms == account.rate_limit_reset_time:
            return None
        account.rate_limit_reset_time = deadline_ms
        change = self.pending.for_key(key)
        change.rate_limit_reset_time, change.reset_lowered = deadline_ms, True
        seconds = seconds_until(deadline_ms, now_ms)
        index = self._index_by_key[key]
        return f"key [{index}] {account.name or 'unnamed'} ({mask_key(key)}): Kimi says its limit resets in {seconds} s"

    def _add_health(self, account: Account, change: PendingChange, delta: int, now_ms: int) -> None:
        new = apply_health_delta(account, delta, now_ms)
        change.health_delta += new.score - account.health_score
        account.health_score = new.score
        account.health_rest_since = change.health_rest_since = new.rest_since

    def _detect_throttle(self, key: str, now_ms: int) -> str | None:
        """None: charge this rate limit to the key. Otherwise Kimi is throttling everyone:
        the key is not charged, earlier charges in the burst are refunded, and the
        returned line says so ('' when the pause is already on)."""
        if now_ms < self.paused_until_ms:
            return ""
        window_start = now_ms - GLOBAL_THROTTLE_WINDOW_MS
        recent = [r for r in self._recent_limits if r.at_ms >= window_start and r.key != key]
        self._recent_limits = recent
        limited_keys = len({r.key for r in recent}) + 1
        if limited_keys < GLOBAL_THROTTLE_KEYS:
            return None
        self.paused_until_ms = now_ms + GLOBAL_PAUSE_MS
        for limit in recent:
            self._refund(limit, now_ms)
        self._recent_limits = []
        return (
            f"{limited_keys} keys rate limited within {GLOBAL_THROTTLE_WINDOW_MS // 1000} s: Kimi is "
            f"throttling this client, not a key; pausing all keys for {GLOBAL_PAUSE_MS // 1000} s "
            "instead of cooling each one"
        )

    def _refund(self, limit: _RecentLimit, now_ms: int) -> None:
        account = self.account(limit.key)
        if account is None:
            return
        change = self.pending.for_key(limit.key)
        account.rate_limit_reset_time = change.rate_limit_reset_time = limit.previous_deadline
        change.reset_lowered = True
        account.cooldown_level = change.cooldown_level = limit.previous_level
        refund = limit.previous_health - account.health_score
        if refund > 0:
            self._add_health(account, change, refund, now_ms)
        if account.consecutive_failures:
            account.consecutive_failures -= 1
            change.consecutive_failures = account.consecutive_failures

    # -- persistence -------------------------------------------------------------
    def take_pending(self) -> tuple[Pending, str | None]:
        """Hand over the changes to flush, with the active key they were based on."""
        taken, self.pending = self.pending, Pending()
        return taken, self._base_active_key

    def give_back(self, taken: Pending) -> None:
        """A flush failed: keep its changes for the next one."""
        taken.absorb(self.pending)
        self.pending = taken

    def adopt(self, on_disk: AccountsFile) -> None:
        """Take the file's state as the new base, with changes since the flush on top."""
        disk_active_key = on_disk.active_key()
        apply_pending(on_disk, self.pending, disk_active_key)
        self._adopt(on_disk)
        self._base_active_key = disk_active_key

    def _adopt(self, state: AccountsFile) -> None:
        self._state = state
        self._index_by_key = {a.key: i for i, a in enumerate(state.accounts)}
        self._base_active_key = state.active_key()
        self._at_cap = set()
        for key, busy in self.in_flight.items():
            account = self.account(key)
            if account is not None:
                self._update_cap(key, busy, account)
