"""A person's edit stamps (`edited_at`): recording them, and reading one from the future as now.

A person's change wins by time, not by save order: the CLI stamps each field it touches
in `edited_at`, and a proxy's change to that field made before the stamp is dropped,
even if the proxy saves it later (it could not have known).

A stamp never lies ahead of the store's clock (the server's `TIME` for a team store):
one further ahead than `clock.AHEAD_SLACK_MS` (a clock that ran ahead, an NTP step back,
a hand edit, an imported file) counts as the moment a store step read it, and is
written back so (`syncing`, `editing`). Otherwise it would outrank every change a proxy
makes until the clocks catch up: a revoked key never disabled, a rate-limited key hit
again after every save. A proxy's changes are compared on the store's clock too
(`skew_ms`), so a machine whose clock runs behind the server's is not outranked either.
"""

from __future__ import annotations

import functools

from pydantic.alias_generators import to_camel

from rotator.core.clock import AHEAD_SLACK_MS, not_ahead
from rotator.core.models import Account, AccountsFile


@functools.cache
def disk_name(attr: str) -> str:
    """The field's name in the file, as `edited_at` records it."""
    return to_camel(attr)


def older_than_person(edited_at: dict[str, int], attr: str, at_ms: int) -> bool:
    """Whether a change to `attr` made at `at_ms` is older than a person's stamp on it."""
    stamp = edited_at.get(disk_name(attr))
    return stamp is not None and at_ms < stamp


def stamp_person_edit(target: Account | AccountsFile, attrs: tuple[str, ...], at_ms: int) -> None:
    """Record that a person set these fields at `at_ms`, even to the value they had."""
    for attr in attrs:
        target.edited_at[disk_name(attr)] = at_ms


def _stamp_maps(state: AccountsFile) -> list[dict[str, int]]:
    return [state.edited_at, *(account.edited_at for account in state.accounts)]


def stamps_ahead(state: AccountsFile, now_ms: int) -> bool:
    """Whether a person's stamp in `state` lies further ahead of `now_ms` than clocks drift."""
    return any(not_ahead(at, now_ms) != at for stamps in _stamp_maps(state) for at in stamps.values())


def clamp_stamps(state: AccountsFile, now_ms: int) -> bool:
    """Make each stamp from the future (`clock.not_ahead`) `now_ms` less the slack; whether
    any was. Less the slack: a proxy's change made from the moment the stamp is read on
    must win, and the proxy's clock agrees with the store's only to within the slack (in
    team mode its skew to the server is measured across a round trip)."""
    clamped = False
    for stamps in _stamp_maps(state):
        for name, at in stamps.items():
            if not_ahead(at, now_ms) != at:
                stamps[name] = now_ms - AHEAD_SLACK_MS
                clamped = True
    return clamped
