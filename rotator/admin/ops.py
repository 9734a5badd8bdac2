"""The named changes a person makes to the pool: add, remove, rotate, use, enable, ...

Each `Op` changes a state in place and returns what to tell the person, or raises
`OpError` before changing anything. Every field an op sets is stamped as a person's
edit (`edit_stamps.stamp_person_edit`), even when it already held that value: the store may
lag a running proxy's memory, and the stamp is what keeps the proxy's older change from
overriding the person's. The CLI runs ops; so do the proxy's mitmproxy commands
(`rotator.proxy.commands`), which aim them at a key rather than an index (`on_key`,
`rotate_past`): the proxy's memory and the file may list the keys in another order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from rotator.core import edit_stamps, merge
from rotator.core.health import HEALTH_MAX, apply_health_delta, rest_period_ms
from rotator.core.key_view import STATUS_READY, status_text, view_key
from rotator.core.keys import key_label, mask_key
from rotator.core.models import COOLDOWN_MINUTES_RANGE, STRATEGIES, Account, AccountsFile, Strategy
from rotator.core.text import clean_line
from rotator.store import StateStore

Op = Callable[[AccountsFile], str]

ENABLE_FIELDS = ("disabled_reason", "consecutive_failures")
CLEAR_LIMIT_FIELDS = (
    "rate_limit_reset_time", "billing_limit_reset_time", "cooldown_reason", "cooldown_level",
    "consecutive_billing_limit_hits",
)
REFRESH_FIELDS = ("health_rest_since", "consecutive_failures")
REFRESH_POINTS = 10


class OpError(Exception):
    """The change can't be made (a bad index, a duplicate key, ...); nothing was written."""


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def describe(index: int, account: Account) -> str:
    return key_label(index, account.name, account.key)


def account_at(state: AccountsFile, index: int) -> Account:
    count = len(state.accounts)
    if count == 0:
        raise OpError(f"index {index} out of range (no keys configured)")
    if not 0 <= index < count:
        raise OpError(f"index {index} out of range ({plural(count, 'key')}: 0-{count - 1})")
    return state.accounts[index]


def names(account: Account, ref: str) -> bool:
    """Whether `ref` names `account` as list-keys shows it: its name or its masked key
    (`sk-kim…abcd`, or `sk-kim...abcd` as typed), or the key itself."""
    masked = mask_key(account.key)
    return ref in (account.name, masked, masked.replace("…", "..."), account.key)


def _quoted(ref: str) -> str:
    return repr(clean_line(ref, 60))


def find_key(state: AccountsFile, ref: str) -> int:
    """The index of the one key `ref` names (see `names`)."""
    found = [i for i, account in enumerate(state.accounts) if names(account, ref)]
    if not found:
        raise OpError(
            f"{_quoted(ref)} is neither an INDEX (a whole number 0 or more) nor the name"
            " or masked key of a key (see list-keys)"
        )
    if len(found) > 1:
        where = ", ".join(f"[{i}]" for i in found)
        raise OpError(f"{plural(len(found), 'key')} match {_quoted(ref)} ({where}); give the index instead")
    return found[0]


def run(store: StateStore, op: Op) -> str:
    """Try `op` on a snapshot (so a refusal writes nothing), then make it for real; what it
    says ends with the store it changed, when it changed one."""
    op(store.read())
    result: list[str] = []
    wrote: list[bool] = []

    def locked_change(state: AccountsFile) -> AccountsFile | None:
        before = state.to_json()
        result.append(op(state))
        wrote.append(state.to_json() != before)
        return state if wrote[-1] else None

    store.edit(locked_change)
    return f"{result[-1]}\nSaved in {store.location}." if wrote[-1] else result[-1]


def _index_of(state: AccountsFile, key: str) -> int:
    index = state.index_of(key)
    if index is None:
        raise OpError(f"key {mask_key(key)} is no longer in the list; nothing changed (see list-keys)")
    return index


def on_key(key: str, make: Callable[[int], Op]) -> Op:
    """`make(index)`, with the index `key` has in the state the op runs on: a change a
    person aimed at one key lands on that key wherever it is by then, or nowhere."""

    def change(state: AccountsFile) -> str:
        return make(_index_of(state, key))(state)

    return change


def on_target(target: int | str, make: Callable[[int], Op]) -> Op:
    """`make(index)` for the key `target` is: an index, or a name or masked key
    (`find_key`) looked up in the state the op runs on."""

    def change(state: AccountsFile) -> str:
        return make(target if isinstance(target, int) else find_key(state, target))(state)

    return change


def rotate_past(key: str, now_ms: int) -> Op:
    """`rotate`, from `key` (the active key the person saw): the key after it becomes
    active, however often the op runs and whatever the state's active key was."""

    def change(state: AccountsFile) -> str:
        state.active_index = _index_of(state, key)
        return rotate(now_ms)(state)

    return change


def add_key(key: str, name: str | None, now_ms: int) -> Op:
    def change(state: AccountsFile) -> str:
        existing = state.index_of(key)
        if existing is not None:
            raise OpError(
                f"key {mask_key(key)} is already in the list at [{existing}] {state.accounts[existing].name}"
            )
        index = len(state.accounts)
        state.accounts.append(Account(key=key, name=name or f"Account {index + 1}", added_at=now_ms))
        return f"Added {describe(index, state.accounts[index])}. {plural(index + 1, 'key')}."

    return change


def remove_key(target: int | str, expect: str | None = None) -> Op:
    """Remove the key at `target` (an index) or named by it (see `names`); with
    `expect`, only if that key is still the one `expect` names. Resolved on the state
    as it is under the lock, so a key another process removed meanwhile can't make
    this remove a different one."""

    def change(state: AccountsFile) -> str:
        index = target if isinstance(target, int) else find_key(state, target)
        removed = account_at(state, index)
        if expect is not None and not names(removed, expect):
            raise OpError(
                f"[{index}] is now {removed.name or 'unnamed'} ({mask_key(removed.key)}), "
                f"not {_quoted(expect)}; nothing removed (see list-keys)"
            )
        del state.accounts[index]
        count = len(state.accounts)
        active = state.active_index
        if index < active:
            active -= 1
        state.active_index = min(active, count - 1) if count else 0
        message = f"Removed {describe(index, removed)}. {plural(count, 'key')} left."
        if count:
            message += f"\nActive key: {describe(state.active_index, state.accounts[state.active_index])}"
        return message

    return change


def rotate(now_ms: int) -> Op:
    def change(state: AccountsFile) -> str:
        count = len(state.accounts)
        if count == 0:
            raise OpError("no keys configured to rotate between; add one with add-key")
        current = state.active_index
        state.active_index = (current + 1) % count if 0 <= current < count else 0
        edit_stamps.stamp_person_edit(state, (merge.ACTIVE_INDEX,), now_ms)
        return _now_using("Rotated to", state, now_ms)

    return change


def use_key(index: int, now_ms: int) -> Op:
    def change(state: AccountsFile) -> str:
        account_at(state, index)
        state.active_index = index
        edit_stamps.stamp_person_edit(state, (merge.ACTIVE_INDEX,), now_ms)
        return _now_using("Now using", state, now_ms)

    return change


def _now_using(verb: str, state: AccountsFile, now_ms: int) -> str:
    index = state.active_index
    message = f"{verb} {describe(index, state.accounts[index])}."
    view = view_key(index, state.accounts[index], index, now_ms, rest_period_ms(state))
    status = status_text(view, now_ms)
    if status != STATUS_READY:
        message += f"\nNote: {status}"
    return message


def set_strategy(strategy: str, now_ms: int) -> Op:
    if strategy not in STRATEGIES:
        raise OpError(f"unknown strategy {strategy!r} (choose one of: {', '.join(STRATEGIES)})")
    chosen: Strategy = strategy  # type: ignore[assignment]  # checked just above

    def change(state: AccountsFile) -> str:
        state.rotation_strategy = chosen
        edit_stamps.stamp_person_edit(state, ("rotation_strategy",), now_ms)
        return f"Rotation strategy set to: {chosen}"

    return change


def enable_key(index: int, now_ms: int) -> Op:
    def change(state: AccountsFile) -> str:
        account = account_at(state, index)
        was = account.disabled_reason
        account.disabled_reason = None
        account.consecutive_failures = 0
        edit_stamps.stamp_person_edit(account, ENABLE_FIELDS, now_ms)
        if was is None:
            return f"{describe(index, account)} was not disabled; it stays enabled."
        return f"Enabled {describe(index, account)} (was disabled: {was})."

    return change


def clear_limits(target: int | Literal["all"], now_ms: int) -> Op:
    def change(state: AccountsFile) -> str:
        if target == "all":
            chosen = list(range(len(state.accounts)))
        else:
            account_at(state, target)
            chosen = [target]
        for i in chosen:
            account = state.accounts[i]
            account.rate_limit_reset_time = 0
            account.billing_limit_reset_time = 0
            account.consecutive_billing_limit_hits = 0
            account.cooldown_reason = None
            account.cooldown_level = 0  # the next cooldown starts short again
            edit_stamps.stamp_person_edit(account, CLEAR_LIMIT_FIELDS, now_ms)
        if target == "all":
            if not chosen:
                return "No keys configured; nothing to clear."
            return f"Cleared rate limits on all {plural(len(chosen), 'key')}."
        return f"Cleared rate limits on {describe(chosen[0], state.accounts[chosen[0]])}."

    return change


def refresh_health(now_ms: int) -> Op:
    """The plugin's manual refresh: +10 (up to 100) for each key below 100 whose limits
    ended at least the cooldown ago; nothing while auto-refresh is off."""

    def change(state: AccountsFile) -> str:
        minutes = state.health_refresh_cooldown_minutes
        if not state.auto_refresh_health:
            return ("Auto-refresh is off, so no health was refreshed."
                    "\nTurn it on with: set-auto-refresh true")
        period = rest_period_ms(state)
        details = []
        for i, account in enumerate(state.accounts):
            health = view_key(i, account, state.active_index, now_ms, period).health
            if health >= HEALTH_MAX or now_ms - account.cooling_until < period:
                continue
            new = apply_health_delta(account, REFRESH_POINTS, now_ms, period)
            account.health_score = new.score
            account.health_rest_since = new.rest_since
            account.consecutive_failures = 0
            edit_stamps.stamp_person_edit(account, REFRESH_FIELDS, now_ms)
            details.append(f"  {describe(i, account)}: {health}% → {new.score}%")
        if not details:
            return ("No keys needed health refresh."
                    f"\nKeys must be below 100% health and past the cooldown period ({_minutes(minutes)}).")
        return "\n".join([f"Refreshed health for {plural(len(details), 'key')}:", *details])

    return change


def set_auto_refresh(enabled: bool, now_ms: int) -> Op:
    def change(state: AccountsFile) -> str:
        state.auto_refresh_health = enabled
        edit_stamps.stamp_person_edit(state, ("auto_refresh_health",), now_ms)
        return f"Auto-refresh health: {'true' if enabled else 'false'}"

    return change


def set_cooldown(minutes: int, now_ms: int) -> Op:
    low, high = COOLDOWN_MINUTES_RANGE
    if not low <= minutes <= high:
        raise OpError(f"cooldown must be between {low} and {high} minutes (24 hours), got {minutes}")

    def change(state: AccountsFile) -> str:
        state.health_refresh_cooldown_minutes = minutes
        edit_stamps.stamp_person_edit(state, ("health_refresh_cooldown_minutes",), now_ms)
        return f"Health refresh cooldown: {_minutes(minutes)}"

    return change


def _minutes(minutes: int | float) -> str:
    return f"{minutes:g} minute" if minutes == 1 else f"{minutes:g} minutes"
