"""How a proxy's changes meet the state they land on: the change record and ONE rule table.

A running proxy never writes its whole memory over the file: it records what it changed
(`PoolChange`, per key a `KeyChange`) and applies that record to whatever the file holds
when it saves, so keys, names and order the CLI changed meanwhile, and another proxy's
counts, survive. Every save path goes through `apply`, and combining two records (a
failed save's changes with newer ones) through `KeyChange.absorb`; both read `RULES`:

- ADD: counters and health points; each side's increments count (health stays 0..100).
- LATER: moments (last use, cooldown deadlines); the later one wins. A change may
  *replace* instead (an exact reset learnt from Kimi, a refunded cooldown): lowering a
  deadline on purpose is then saved like any other value.
- SET: the latest writer wins, and None (cleared) is a value like any other.
- BY_DAY: counts per date (`dailyRequests`); each side's increments add, day by day, and
  dates older than `stats.DAYS_KEPT` are dropped.
- SUMS: named counts (`tokens`: input, output, cacheRead, cacheWrite); each adds, name by name.
- SUMS_BY_DAY: named counts per date (`dailyTokens`); each adds, day by day and name by
  name, and dates older than `stats.DAYS_KEPT` are dropped.
- SUMS_BY_MEMBER_DAY: the same per member of a team (`memberTokens`: member, date, name).
- NEWEST: a bounded history (`responseTimes`); each side's entries are appended and the
  newest `stats.RESPONSE_TIMES_KEPT` kept.
- READING: a measurement (`quota`, Kimi's /usages); the one taken last wins, whoever
  saves last.

A person's change wins by time, not by save order (rotator/core/edit_stamps.py): a
proxy's change to a field a person stamped later is dropped, and a stamp from the future
is read as now by every store step (`syncing`, `editing`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rotator.core.edit_stamps import clamp_stamps, older_than_person
from rotator.core.health import clamp_health
from rotator.core.models import Account, AccountsFile
from rotator.core.stats import RESPONSE_TIMES_KEPT, drop_old_days


class Rule(enum.Enum):
    ADD = "add"
    LATER = "later"
    SET = "set"
    BY_DAY = "by_day"
    NEWEST = "newest"
    READING = "reading"
    SUMS = "sums"
    SUMS_BY_DAY = "sums_by_day"
    SUMS_BY_MEMBER_DAY = "sums_by_member_day"


RULES: dict[str, Rule] = {
    "total_requests": Rule.ADD,
    "successful_requests": Rule.ADD,
    "health_score": Rule.ADD,
    "last_used": Rule.LATER,
    "rate_limit_reset_time": Rule.LATER,
    "consecutive_failures": Rule.SET,
    "health_rest_since": Rule.SET,
    "disabled_reason": Rule.SET,
    "cooldown_reason": Rule.SET,
    "cooldown_level": Rule.SET,
    "consecutive_billing_limit_hits": Rule.SET,
    "daily_requests": Rule.BY_DAY,
    "response_times": Rule.NEWEST,
    "quota": Rule.READING,
    "tokens": Rule.SUMS,
    "daily_tokens": Rule.SUMS_BY_DAY,
    "member_tokens": Rule.SUMS_BY_MEMBER_DAY,
}
# Fields a `set` may lower (LATER ones), by name: `set` runs on every answer.
_LATER_FIELDS = frozenset(attr for attr, rule in RULES.items() if rule is Rule.LATER)
# Rules whose values are counts, history or measurements: never undone by a person's edit.
_COUNTED = frozenset({Rule.ADD, Rule.BY_DAY, Rule.NEWEST, Rule.READING, Rule.SUMS, Rule.SUMS_BY_DAY, Rule.SUMS_BY_MEMBER_DAY})
_CLAMPED = {"health_score": clamp_health}
# Fields that decide whether a key can be chosen: a proxy that changed one tells the
# others at once (a shared store's notices) instead of at their next save.
_DECISIVE = frozenset({"rate_limit_reset_time", "disabled_reason", "cooldown_reason", "cooldown_level"})
# Top-level field a proxy changes: the key it moved the pool to.
ACTIVE_INDEX = "active_index"

@dataclass(slots=True)
class FieldChange:
    value: Any
    at_ms: int  # when the change (its latest part) was made
    replace: bool = False  # for LATER fields: this value replaces, lowering included


@dataclass(slots=True)
class KeyChange:
    """One key's changes since the last save, by attribute name."""

    fields: dict[str, FieldChange] = field(default_factory=dict)

    def add(self, attr: str, delta: int, at_ms: int) -> None:
        found = self.fields.get(attr)
        if found is None:
            self.fields[attr] = FieldChange(delta, at_ms)
        else:
            found.value += delta
            found.at_ms = at_ms

    def count_day(self, attr: str, day: str, at_ms: int) -> None:
        """One more on `day` (a BY_DAY field)."""
        found = self.fields.get(attr)
        if found is None:
            self.fields[attr] = FieldChange({day: 1}, at_ms)
        else:
            counts = found.value
            counts[day] = counts.get(day, 0) + 1
            found.at_ms = at_ms

    # The three below hand out a SUMS-kind field's named counts to add into in place
    # (`add_sums`, or `add_sums_to_each`: an answer's tokens go into several totals in one pass).
    def sums(self, attr: str, at_ms: int) -> dict[str, int]:
        """A SUMS field's named counts in this record (none yet: an empty one, kept)."""
        found = self.fields.get(attr)
        if found is None:
            sums: dict[str, int] = {}
            self.fields[attr] = FieldChange(sums, at_ms)
            return sums
        found.at_ms = at_ms
        return found.value

    def sums_on_day(self, attr: str, day: str, at_ms: int) -> dict[str, int]:
        """A SUMS_BY_DAY field's named counts on `day` in this record."""
        found = self.fields.get(attr)
        if found is None:
            sums: dict[str, int] = {}
            self.fields[attr] = FieldChange({day: sums}, at_ms)
            return sums
        found.at_ms = at_ms
        return found.value.setdefault(day, {})

    def member_sums_on_day(self, attr: str, member: str, day: str, at_ms: int) -> dict[str, int]:
        """A SUMS_BY_MEMBER_DAY field's named counts for `member` on `day` in this record."""
        found = self.fields.get(attr)
        if found is None:
            sums: dict[str, int] = {}
            self.fields[attr] = FieldChange({member: {day: sums}}, at_ms)
            return sums
        found.at_ms = at_ms
        return found.value.setdefault(member, {}).setdefault(day, {})

    def append_newest(self, attr: str, value: Any, at_ms: int) -> None:
        """One more entry of a NEWEST field's history."""
        found = self.fields.get(attr)
        if found is None:
            self.fields[attr] = FieldChange([value], at_ms)
        else:
            entries = found.value
            entries.append(value)
            if len(entries) > RESPONSE_TIMES_KEPT:
                del entries[0]
            found.at_ms = at_ms

    def later(self, attr: str, value: int, at_ms: int) -> None:
        found = self.fields.get(attr)
        if found is None:
            self.fields[attr] = FieldChange(value, at_ms)
        elif value >= found.value:
            found.value = value
            found.at_ms = at_ms

    def set(self, attr: str, value: Any, at_ms: int) -> None:
        """A SET field's new value, or a LATER field's replacement (it may be lower)."""
        found = self.fields.get(attr)
        if found is None:
            self.fields[attr] = FieldChange(value, at_ms, attr in _LATER_FIELDS)
        else:  # set on every success: the record's own entry, rewritten, costs no new object
            found.value, found.at_ms, found.replace = value, at_ms, attr in _LATER_FIELDS

    def absorb(self, newer: KeyChange) -> None:
        """Fold `newer` into this record, as if both had happened in order."""
        for attr, new in newer.fields.items():
            old = self.fields.get(attr)
            rule = RULES[attr]
            if old is None:
                self.fields[attr] = FieldChange(_copied(rule, new.value), new.at_ms, new.replace)
                continue
            if rule is Rule.ADD:
                old.value += new.value
            elif rule is Rule.BY_DAY:
                _add_days(old.value, new.value)
            elif rule is Rule.NEWEST:
                old.value = (old.value + new.value)[-RESPONSE_TIMES_KEPT:]
            elif rule is Rule.SUMS:
                add_sums(old.value, new.value)
            elif rule is Rule.SUMS_BY_DAY:
                _add_sums_by_day(old.value, new.value)
            elif rule is Rule.SUMS_BY_MEMBER_DAY:
                for member, days in new.value.items():
                    _add_sums_by_day(old.value.setdefault(member, {}), days)
            elif rule is Rule.LATER and not new.replace:
                old.value = max(old.value, new.value)  # a replacement stays one, raised
            else:
                old.value, old.replace = new.value, new.replace
            old.at_ms = max(old.at_ms, new.at_ms)


@dataclass(slots=True)
class PoolChange:
    """What a proxy changed since its last save: per key, and the key it moved to."""

    keys: dict[str, KeyChange] = field(default_factory=dict)
    active_key: FieldChange | None = None

    def __bool__(self) -> bool:
        return bool(self.keys) or self.active_key is not None

    def for_key(self, key: str) -> KeyChange:
        change = self.keys.get(key)
        if change is None:
            change = self.keys[key] = KeyChange()
        return change

    def move_active(self, key: str, at_ms: int) -> None:
        self.active_key = FieldChange(key, at_ms)

    def absorb(self, newer: PoolChange) -> None:
        for key, change in newer.keys.items():
            self.for_key(key).absorb(change)
        if newer.active_key is not None:
            self.active_key = newer.active_key


def is_decisive(change: PoolChange) -> bool:
    """Whether `change` makes a key usable or not (a cooldown, a disabled key), as
    opposed to counts, moments and the rotation, which can wait for the next save."""
    return any(not _DECISIVE.isdisjoint(key_change.fields) for key_change in change.keys.values())


def apply(state: AccountsFile, change: PoolChange, skew_ms: int = 0) -> AccountsFile:
    """Apply a proxy's `change` to `state` (mutated and returned). `skew_ms`: how far
    the clock that stamped `state` (the store's) runs ahead of the one `change` was
    timed by (the proxy's).

    Keys `state` no longer has were removed by someone else and stay removed. A key the
    file lists twice is one key: its first entry takes the change (`rotator.core.oddities`).
    """
    if change.keys:
        applied: set[str] = set()
        for account in state.accounts:
            key_change = change.keys.get(account.key)
            if key_change is not None and account.key not in applied:
                applied.add(account.key)
                apply_to_account(account, key_change, skew_ms)
    moved = change.active_key
    if moved is not None and not older_than_person(state.edited_at, ACTIVE_INDEX, moved.at_ms + skew_ms):
        index = state.index_of(moved.value)
        if index is not None:
            state.active_index = index
    return state


def apply_to_account(account: Account, change: KeyChange, skew_ms: int = 0) -> None:
    edited = account.edited_at
    for attr, new in change.fields.items():
        rule = RULES[attr]
        # Counts are never undone: a person's edit only outranks values.
        if edited and rule not in _COUNTED and older_than_person(edited, attr, new.at_ms + skew_ms):
            continue
        if rule is Rule.BY_DAY:
            daily = getattr(account, attr)
            _add_days(daily, new.value)
            drop_old_days(daily, new.at_ms)
        elif rule is Rule.NEWEST:
            setattr(account, attr, (getattr(account, attr) + new.value)[-RESPONSE_TIMES_KEPT:])
        elif rule is Rule.SUMS:
            add_sums(getattr(account, attr), new.value)
        elif rule is Rule.SUMS_BY_DAY:
            daily_sums = getattr(account, attr)
            _add_sums_by_day(daily_sums, new.value)
            drop_old_days(daily_sums, new.at_ms)
        elif rule is Rule.SUMS_BY_MEMBER_DAY:
            by_member = getattr(account, attr)
            for member, days in new.value.items():
                member_days = by_member.setdefault(member, {})
                _add_sums_by_day(member_days, days)
                drop_old_days(member_days, new.at_ms)
        elif rule is Rule.ADD:
            value = getattr(account, attr) + new.value
            clamp = _CLAMPED.get(attr)
            setattr(account, attr, clamp(value) if clamp else value)
        elif rule is Rule.LATER and not new.replace:
            if new.value > getattr(account, attr):
                setattr(account, attr, new.value)
        elif rule is Rule.READING:
            current = getattr(account, attr)
            if current is None or new.value.taken_at >= current.taken_at:
                setattr(account, attr, new.value)
        else:
            setattr(account, attr, new.value)


def _add_days(into: dict[str, int], counts: dict[str, int]) -> None:
    for day, count in counts.items():
        into[day] = into.get(day, 0) + count


def add_sums(into: dict[str, int], counts: Mapping[str, int]) -> None:
    """Add named counts into `into`, name by name (a SUMS field)."""
    for name, count in counts.items():
        into[name] = into.get(name, 0) + count


def add_sums_to_each(intos: tuple[dict[str, int], ...], counts: Mapping[str, int]) -> None:
    """`add_sums` of the same counts into each of `intos`, in one pass over the counts."""
    for name, count in counts.items():
        for into in intos:
            into[name] = into.get(name, 0) + count


def _add_sums_by_day(into: dict[str, dict[str, int]], counts: Mapping[str, Mapping[str, int]]) -> None:
    for day, sums in counts.items():
        found = into.get(day)
        if found is None:
            into[day] = dict(sums)
        else:
            add_sums(found, sums)


def _copied(rule: Rule, value: Any) -> Any:
    # A record's dict or list must not be shared with the record it came from.
    if rule in (Rule.BY_DAY, Rule.SUMS):
        return dict(value)
    if rule is Rule.SUMS_BY_DAY:
        return {day: dict(sums) for day, sums in value.items()}
    if rule is Rule.SUMS_BY_MEMBER_DAY:
        return {member: {day: dict(sums) for day, sums in days.items()} for member, days in value.items()}
    if rule is Rule.NEWEST:
        return list(value)
    return value


# What a store does to the state it holds under its lock: the state to write, or None.
StoreStep = Callable[[AccountsFile], AccountsFile | None]


def syncing(change: PoolChange, now_ms: int, skew_ms: int = 0) -> StoreStep:
    """A proxy's save, as a store makes it on the state it holds (at `now_ms` on its
    clock): stamps from the future read as now, then `change` applied. Returns None when
    there is nothing to write."""

    def step(state: AccountsFile) -> AccountsFile | None:
        clamped = clamp_stamps(state, now_ms)
        if not change:
            return state if clamped else None
        return apply(state, change, skew_ms)

    return step


def editing(change: StoreStep, now_ms: int) -> StoreStep:
    """A person's `change`, as a store makes it at `now_ms` on its clock: stamps from the
    future read as now, before and after (a person's clock may run ahead of the store's)."""

    def step(state: AccountsFile) -> AccountsFile | None:
        clamped = clamp_stamps(state, now_ms)
        changed = change(state)
        if changed is None:
            return state if clamped else None
        clamp_stamps(changed, now_ms)
        return changed

    return step
