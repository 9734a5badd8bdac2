"""What an answer, a quota reading or a refund does to one key's saved state.

Each function changes an `Account` in place and records every field it touches in the
key's change record (`merge.KeyChange`), so the next save merges exactly that; each
returns the log line a person should see, or None. Nothing here knows of in-flight
counts, waiting requests or the team: the pool (`rotator.pool.key_pool`) calls these and does
the rest.
"""

from __future__ import annotations

from rotator.core import edit_stamps, merge, quota, stats, throttle
from rotator.core.key_view import until_text
from rotator.core.health import HEALTH_MAX, apply_health_delta
from rotator.core.models import Account
from rotator.core.policy import Outcome, Verdict
from rotator.tokens import Usage
from rotator.tokens.usage import FIELD_NAMES

# Cooldowns that follow each other with no success between them grow: ×2 each time,
# up to this cap. Plan windows and disabled keys have their own deadlines and don't.
MAX_BACKOFF_MS = 30 * 60 * 1000
BACKOFF_VERDICTS = frozenset({Verdict.RATE_LIMITED, Verdict.CONCURRENCY_LIMIT, Verdict.ACCESS_DENIED})


def apply_answer(
    account: Account, change: merge.KeyChange, label: str, outcome: Outcome, now_ms: int,
    took_ms: int | None, rest_ms: int, enable_hint: str | None = None,
) -> str | None:
    """An attempt's answer: health, counts, a disabled key, a cooldown (growing while
    refusals follow each other with no success between)."""
    was_cooling = account.rate_limit_reset_time > now_ms or account.billing_limit_reset_time > now_ms
    delta = outcome.health_delta
    if delta < 0 or (delta > 0 and account.health_score < HEALTH_MAX):
        add_health(account, change, delta, now_ms, rest_ms)
    event: str | None = None
    if outcome.counts_as_success:
        if stats.record_success(account, change, took_ms, now_ms):
            event = f"key {label} recovered: back to full traffic"
    elif outcome.health_delta < 0:
        account.consecutive_failures += 1
        change.set("consecutive_failures", account.consecutive_failures, now_ms)
    if outcome.disable and account.disabled_reason is None:
        event = disable(account, change, label, outcome.reason, now_ms, enable_hint)
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
                event = f"key {label} cooling for {until_text(deadline, now_ms)}: {outcome.reason}"
    return event


def disable(account: Account, change: merge.KeyChange, label: str, reason: str, now_ms: int,
            enable_hint: str | None) -> str:
    """`enable_hint`: the command that puts the key back (`kimi-rotator enable-key 2`), or
    None where a person cannot (Kimi banned the account)."""
    account.disabled_reason = reason
    change.set("disabled_reason", reason, now_ms)
    if enable_hint is None:
        return f"key {label} disabled: {reason} (enabling the key again would not help)"
    return f"key {label} disabled: {reason}; run `{enable_hint}` to use it again"


def add_health(account: Account, change: merge.KeyChange, delta: int, now_ms: int, rest_ms: int) -> None:
    new = apply_health_delta(account, delta, now_ms, rest_ms)
    change.add("health_score", new.score - account.health_score, now_ms)
    account.health_score = new.score
    account.health_rest_since = new.rest_since
    change.set("health_rest_since", new.rest_since, now_ms)


def refunded(account: Account, change: merge.KeyChange, limit: throttle.RecentLimit, now_ms: int, rest_ms: int) -> None:
    """A rate limit charged to the key that was the whole team's throttle: its deadline,
    level, health and failure count as they were before it."""
    account.rate_limit_reset_time = limit.previous_deadline
    change.set("rate_limit_reset_time", limit.previous_deadline, now_ms)
    account.cooldown_level = limit.previous_level
    change.set("cooldown_level", limit.previous_level, now_ms)
    refund = limit.previous_health - account.health_score
    if refund > 0:
        add_health(account, change, refund, now_ms, rest_ms)
    if account.consecutive_failures:
        account.consecutive_failures -= 1
        change.set("consecutive_failures", account.consecutive_failures, now_ms)


def spent_window(account: Account, reserve_percent: float, now_ms: int) -> quota.SpentWindow | None:
    """The window the key's quota reading shows spent, if it should cool the key now: not
    if it cools longer already, nor if a person cleared its cooldown after the reading
    was taken (they may know better: a topped-up plan)."""
    reading = account.quota
    spent = quota.steer(reading, reserve_percent, now_ms)
    if spent is None or reading is None or spent.until_ms <= account.rate_limit_reset_time:
        return None
    if account.edited_at.get(edit_stamps.disk_name("rate_limit_reset_time"), 0) > reading.taken_at:
        return None
    return spent


def cooled_by_window(account: Account, change: merge.KeyChange, label: str, spent: quota.SpentWindow,
                     now_ms: int) -> str | None:
    was_cooling = account.cooling_until > now_ms
    account.rate_limit_reset_time = spent.until_ms
    change.later("rate_limit_reset_time", spent.until_ms, now_ms)
    account.cooldown_reason = spent.reason
    change.set("cooldown_reason", spent.reason, now_ms)
    if was_cooling:
        return None
    return f"key {label} cooling for {until_text(spent.until_ms, now_ms)}: {spent.reason}"


def spent(account: Account, change: merge.KeyChange, usage: Usage, now_ms: int, member: str | None = None) -> None:
    """The tokens an answer on the key spent: its totals and today's, and today's of the
    team member (the proxy) it went through, in team mode; each in the account and in
    its change record."""
    counts = {name: count for name, count in zip(FIELD_NAMES, (usage.input, usage.output, usage.cache_read,
                                                                usage.cache_write)) if count}
    if not counts:
        return
    day = stats.utc_day(now_ms)
    totals: tuple[dict[str, int], ...] = (
        account.tokens, account.daily_tokens.setdefault(day, {}),
        change.sums("tokens", now_ms), change.sums_on_day("daily_tokens", day, now_ms),
    )
    if member is not None:
        totals += (
            account.member_tokens.setdefault(member, {}).setdefault(day, {}),
            change.member_sums_on_day("member_tokens", member, day, now_ms),
        )
    merge.add_sums_to_each(totals, counts)
