"""One read model of a key (`KeyView`), and the one line that says its state.

The CLI's list and its JSON (rotator.cli.render), the proxy's log lines and its own error
answers, the status page and the mitmproxy commands all describe a key from a `KeyView`,
so a key reads the same everywhere and only ever masked.
A key is cooling until the later of its rate-limit and billing deadlines.
"""

from __future__ import annotations

import time

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rotator.core.clock import seconds_until
from rotator.core.health import HEALTH_SKIP_BELOW, RECOVERY_PERIOD_MS, effective_health, rest_period_ms
from rotator.core.keys import label, mask_key
from rotator.core.models import Account, AccountsFile
from rotator.core.quota import QuotaReading
from rotator.core.stats import KeyStats, key_stats

BILLING_REASON = "billing limit (billingLimitResetTime)"
SUMMARY_MOST = 20


class KeyState(enum.Enum):
    READY = "ready"  # usable; whether it is the one in use is `KeyView.active`
    COOLING = "cooling"
    DISABLED = "disabled"
    LOW_HEALTH = "low_health"


@dataclass(frozen=True, slots=True)
class KeyView:
    index: int
    name: str
    masked_key: str
    active: bool
    health: int  # with resting recovery applied
    total_requests: int
    successful_requests: int
    state: KeyState
    rate_limit_reset_time: int  # the cooldown's end, billing included (past when not cooling)
    disabled_reason: str | None
    cooldown_reason: str | None
    last_used: int
    response_times: Sequence[int | float] = ()  # the account's own, not copied
    daily_requests: Mapping[str, int] = field(default_factory=dict)
    quota: QuotaReading | None = None  # the latest /usages reading (rotator.core.quota)
    tokens: Mapping[str, int] = field(default_factory=dict)  # since added (rotator.tokens)
    daily_tokens: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # per UTC day
    member_tokens: Mapping[str, Mapping[str, Mapping[str, int]]] = field(default_factory=dict)  # per member, day

    def stats(self, now: int) -> KeyStats:
        return key_stats(self.total_requests, self.successful_requests, self.response_times,
                         self.daily_requests, now)

    @property
    def label(self) -> str:
        return label(self.index, self.name, self.masked_key)


def view_key(
    index: int, account: Account, active_index: int, now: int, rest_ms: int = RECOVERY_PERIOD_MS
) -> KeyView:
    health = effective_health(account, now, rest_ms)
    cooling_until = account.cooling_until
    reason = account.cooldown_reason
    if account.billing_limit_reset_time > max(now, account.rate_limit_reset_time):
        reason = BILLING_REASON
    if account.disabled_reason is not None:
        state = KeyState.DISABLED
    elif cooling_until > now:
        state = KeyState.COOLING
    elif health < HEALTH_SKIP_BELOW:
        state = KeyState.LOW_HEALTH
    else:
        state = KeyState.READY
    return KeyView(
        index=index,
        name=account.name,
        masked_key=mask_key(account.key),
        active=index == active_index,
        health=health,
        total_requests=account.total_requests,
        successful_requests=account.successful_requests,
        state=state,
        rate_limit_reset_time=cooling_until,
        disabled_reason=account.disabled_reason,
        cooldown_reason=reason,
        last_used=account.last_used,
        response_times=account.response_times,
        daily_requests=account.daily_requests,
        quota=account.quota,
        tokens=account.tokens,
        daily_tokens=account.daily_tokens,
        member_tokens=account.member_tokens,
    )


def view_pool(state: AccountsFile, now: int) -> list[KeyView]:
    rest_ms = rest_period_ms(state)
    return [view_key(i, a, state.active_index, now, rest_ms) for i, a in enumerate(state.accounts)]


# -- text for people ------------------------------------------------------------------

DAY_MS = 86_400_000
STATUS_READY = "✓ Ready"  # usable; "in use" is the ● of the key the pool is on


def format_duration(ms: int) -> str:
    """`4m 12s`, `45s`, `2h 05m`, `3d 4h`; rounded up so it never shows 0s while waiting."""
    seconds = seconds_until(ms, 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def until_text(deadline_ms: int, now_ms: int) -> str:
    """`4m 12s, until 14:05`; a day or more away: `6d 23h, until Mon 14:05` (this machine's
    clock time, as the log's own timestamps)."""
    left = deadline_ms - now_ms
    at = time.localtime(deadline_ms / 1000)
    clock = time.strftime("%a %H:%M" if left >= DAY_MS else "%H:%M", at)
    return f"{format_duration(left)}, until {clock}"


def status_text(view: KeyView, now: int) -> str:
    if view.state is KeyState.DISABLED:
        return f"✗ Disabled: {view.disabled_reason}"
    if view.state is KeyState.COOLING:
        text = f"⏳ Cooling down (free in {format_duration(view.rate_limit_reset_time - now)})"
        return f"{text}: {view.cooldown_reason}" if view.cooldown_reason else text
    if view.state is KeyState.LOW_HEALTH:
        return "⚠ Low health (skipped until it recovers)"
    return STATUS_READY


def summary(views: Sequence[KeyView], now: int, most: int = SUMMARY_MOST) -> str:
    """One line on every key, for the proxy's own error answers: `Keys: [0] sk-kim…abcd
    free in 12 s, rate limited (HTTP 429); [1] sk-kim…wxyz disabled (…).`"""
    parts = []
    for view in views[:most]:
        short = f"[{view.index}] {view.masked_key}"
        if view.state is KeyState.DISABLED:
            parts.append(f"{short} disabled ({view.disabled_reason})")
        elif view.rate_limit_reset_time > now:
            why = f", {view.cooldown_reason}" if view.cooldown_reason else ""
            parts.append(f"{short} free in {seconds_until(view.rate_limit_reset_time, now)} s{why}")
        else:
            parts.append(f"{short} busy")
    if len(views) > most:
        parts.append(f"and {len(views) - most} more")
    return "Keys: " + "; ".join(parts) + "."
