"""The CLI's text and JSON for keys, built on the one read model of a key
(`rotator.core.key_view.KeyView`): the list-keys block and its JSON, Kimi's quota readings
(list-keys and `usage`), and what `stats` shows (its numbers from `rotator.core.stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rotator.core.key_view import KeyView, format_duration, status_text
from rotator.core.quota import QuotaReading, QuotaWindow
from rotator.core.stats import KeyStats, key_stats, last_days
from rotator.core.text import NAME_MOST, clean_line
from rotator.status.document import window_json
from rotator.tokens import Usage, shown

BAR_CELLS = 10


def health_bar(health: int) -> str:
    filled = max(0, min(BAR_CELLS, int(health / 10 + 0.5)))  # round half up
    return "█" * filled + "░" * (BAR_CELLS - filled)


def list_block(view: KeyView, now: int) -> list[str]:
    """The list-keys block for one key (the TypeScript plugin's layout)."""
    return [
        f"{'●' if view.active else '○'} [{view.index}] {view.name}",
        f"   Key: {view.masked_key}",
        f"   Health: {health_bar(view.health)} {view.health}%",
        f"   Requests: {view.successful_requests}/{view.total_requests} successful",
        f"   Status: {status_text(view, now)}",
        *token_line(view),
        *quota_lines(view, now),
    ]


def token_line(view: KeyView) -> list[str]:
    """list-keys' line of the tokens Kimi reported the key spent; none before any."""
    spent = shown.saved(view.tokens)
    return [f"   Tokens: {shown.summary(spent)}"] if spent != Usage() else []


def as_json(view: KeyView, now: int) -> dict[str, object]:
    return {
        "index": view.index,
        "active": view.active,
        "name": view.name,
        "maskedKey": view.masked_key,
        "health": view.health,
        "totalRequests": view.total_requests,
        "successfulRequests": view.successful_requests,
        "rateLimitResetTime": view.rate_limit_reset_time,
        "cooling": view.rate_limit_reset_time > now,
        "disabledReason": view.disabled_reason,
        "cooldownReason": view.cooldown_reason,
        "lastUsed": view.last_used,
        "status": status_text(view, now),
        "tokens": shown.saved(view.tokens).as_fields(),
        **({"quota": quota_json(view.quota)} if view.quota is not None else {}),
    }


# -- quota (Kimi's /usages) -----------------------------------------------------------


def quota_bar(window: QuotaWindow) -> str:
    """The share of the window used, in BAR_CELLS cells (all empty when unknown)."""
    ratio = window.remaining_ratio()
    used = 0.0 if ratio is None else 1.0 - ratio
    filled = max(0, min(BAR_CELLS, int(used * BAR_CELLS + 0.5)))
    return "█" * filled + "░" * (BAR_CELLS - filled)


def window_line(window: QuotaWindow, now: int) -> str:
    """`5-hour  ███████░░░  140/200 used, 60 left, resets in 2h 05m`."""
    if window.used is not None:
        parts = [f"{window.used}/{window.limit} used" if window.limit is not None else f"{window.used} used"]
    else:
        parts = [f"limit {window.limit}" if window.limit is not None else "usage unknown"]
    if window.left is not None:
        parts.append(f"{window.left} left" + (" (spent)" if window.is_spent(0.0) else ""))
    if window.reset_time > now:
        parts.append(f"resets in {format_duration(window.reset_time - now)}")
    elif window.reset_time:
        parts.append(f"reset {format_duration(now - window.reset_time)} ago (reading out of date)")
    return f"{window.name:<8}{quota_bar(window)}  {', '.join(parts)}"


def parallel_line(reading: QuotaReading) -> str | None:
    if reading.parallel_limit is None:
        return None
    return f"parallel limit: {reading.parallel_limit} requests at once"


def reading_age(reading: QuotaReading, now: int) -> str:
    """`read 5m 0s ago`: how old a reading is."""
    if not reading.taken_at:
        return "read at an unknown time"
    if reading.taken_at >= now:
        return "read just now"
    return f"read {format_duration(now - reading.taken_at)} ago"


def reading_lines(reading: QuotaReading, now: int) -> list[str]:
    """One line per window, then the parallel limit (what `usage` prints for a key)."""
    lines = [window_line(window, now) for window in reading.windows]
    parallel = parallel_line(reading)
    return lines + ([parallel] if parallel else [])


def quota_lines(view: KeyView, now: int) -> list[str]:
    """The latest reading under a key in list-keys; nothing when none was taken."""
    if view.quota is None:
        return []
    lines = [f"   Quota ({reading_age(view.quota, now)}):"]
    return lines + [f"     {line}" for line in reading_lines(view.quota, now)]


def quota_json(reading: QuotaReading) -> dict[str, object]:
    """A reading in JSON output: windows with limit/used/remaining/resetTime (ms)."""
    return {
        "takenAt": reading.taken_at,
        "windows": [window_json(w) for w in reading.windows],
        "parallelLimit": reading.parallel_limit,
    }


# -- stats ----------------------------------------------------------------------------

SPARK = "▁▂▃▄▅▆▇█"
SPARK_NONE = "·"


def day_bar(counts: Sequence[int]) -> str:
    """One cell per day, scaled to the busiest day; `·` for a day with none."""
    top = max(counts, default=0)
    if top <= 0:
        return SPARK_NONE * len(counts)
    return "".join(SPARK[max(0, -(-c * len(SPARK) // top) - 1)] if c > 0 else SPARK_NONE for c in counts)


def _ms(value: int | float | None) -> str:
    return "N/A" if value is None else f"{value:g}ms"


def stats_block(view: KeyView, now: int) -> list[str]:
    """The stats block for one key (the plugin's layout, plus a bar of the last 7 days)."""
    numbers = view.stats(now)
    lines = [
        f"[{view.index}] {view.name}",
        f"   Key: {view.masked_key}",
        f"   Total Requests: {numbers.total}",
        f"   Successful: {numbers.successful}",
        f"   Failed: {numbers.failed}",
    ]
    if numbers.success_rate is not None:
        lines.append(f"   Success Rate: {numbers.success_rate:.1f}%")
    lines.append(f"   Avg Response Time: {_ms(numbers.average_ms)}")
    if numbers.min_ms is not None:
        lines.append(f"   Response Time Range: {_ms(numbers.min_ms)} - {_ms(numbers.max_ms)}")
    first, last = numbers.week[0][0], numbers.week[-1][0]
    lines += [
        f"   Requests Today: {numbers.today}",
        f"   Requests Last 7 Days: {numbers.last_7_days}",
        f"   Last 7 Days: {day_bar([c for _, c in numbers.week])}  ({first[5:]} … {last[5:]})",
        *token_lines(TokenStats.of([view], now)),
    ]
    return lines


@dataclass(frozen=True, slots=True)
class TokenStats:
    """The tokens Kimi reported: since the keys were added, today and the last 7 days (UTC)."""

    total: Usage
    today: Usage
    week: Usage

    @classmethod
    def of(cls, views: Sequence[KeyView], now: int) -> TokenStats:
        days = last_days(now)
        total = today = week = Usage()
        for view in views:
            total += shown.saved(view.tokens)
            today += shown.on_days(view.daily_tokens, days[-1:])
            week += shown.on_days(view.daily_tokens, days)
        return cls(total, today, week)

    def as_json(self) -> dict[str, object]:
        return {
            "tokens": self.total.as_fields(),
            "cacheShare": _share(self.total),
            "tokensToday": self.today.as_fields(),
            "cacheShareToday": _share(self.today),
            "tokensLast7Days": self.week.as_fields(),
            "cacheShareLast7Days": _share(self.week),
        }


def _share(usage: Usage) -> float | None:
    part = usage.cache_share
    return None if part is None else round(part, 4)


def token_lines(numbers: TokenStats) -> list[str]:
    return [
        f"   Tokens: {shown.summary(numbers.total)}",
        f"   Tokens Today: {shown.summary(numbers.today)}",
        f"   Tokens Last 7 Days: {shown.summary(numbers.week)}",
    ]


def total_stats(views: Sequence[KeyView], now: int) -> KeyStats:
    """Every key's numbers together (response times pooled, as the plugin averages them)."""
    daily: dict[str, int] = {}
    for view in views:
        for day, count in view.daily_requests.items():
            daily[day] = daily.get(day, 0) + count
    times = [t for v in views for t in v.response_times]
    return key_stats(sum(v.total_requests for v in views), sum(v.successful_requests for v in views),
                     times, daily, now)


def stats_page(views: Sequence[KeyView], now: int, add_hint: str) -> str:
    """What `stats` prints: each key's block, then the totals."""
    if not views:
        return f"No Kimi API keys configured.\nAdd one with: {add_hint}"
    lines = ["📊 Usage Statistics"]
    for view in views:
        lines += ["", *stats_block(view, now)]
    return "\n".join([*lines, "", *stats_totals(views, now)])


def stats_totals(views: Sequence[KeyView], now: int) -> list[str]:
    numbers = total_stats(views, now)
    lines = [
        "─" * 50,
        "📈 Aggregate Statistics",
        f"   Total Requests (All Keys): {numbers.total}",
        f"   Total Successful: {numbers.successful}",
    ]
    if numbers.success_rate is not None:
        lines.append(f"   Overall Success Rate: {numbers.success_rate:.1f}%")
    if numbers.average_ms is not None:
        lines.append(f"   Overall Avg Response Time: {_ms(numbers.average_ms)}")
    lines += [
        f"   Requests Today: {numbers.today}",
        f"   Requests Last 7 Days: {numbers.last_7_days}",
        *token_lines(TokenStats.of(views, now)),
    ]
    return lines


def _stats_doc(numbers: KeyStats) -> dict[str, object]:
    return {
        "totalRequests": numbers.total,
        "successfulRequests": numbers.successful,
        "failedRequests": numbers.failed,
        "successRate": numbers.success_rate,
        "avgResponseTimeMs": numbers.average_ms,
        "minResponseTimeMs": numbers.min_ms,
        "maxResponseTimeMs": numbers.max_ms,
        "requestsToday": numbers.today,
        "requestsLast7Days": numbers.last_7_days,
        "last7Days": dict(numbers.week),
    }


def stats_json(views: Sequence[KeyView], now: int) -> dict[str, object]:
    """`stats --json`: each key's numbers (masked), then the totals."""
    return {
        "accounts": [
            {"index": v.index, "name": v.name, "maskedKey": v.masked_key, **_stats_doc(v.stats(now)),
             **TokenStats.of([v], now).as_json()}
            for v in views
        ],
        "totals": {**_stats_doc(total_stats(views, now)), **TokenStats.of(views, now).as_json()},
    }


# -- tokens by team member ----------------------------------------------------------------


def by_member(views: Sequence[KeyView], now: int) -> list[dict[str, object]]:
    """`stats --by-member --json`: per team member (the proxies' `kimi_member`), the tokens
    of the last 7 days (UTC, the weekly window) and of today, in total and per key;
    members by most input first."""
    days = last_days(now)
    members: dict[str, list[tuple[KeyView, Usage, Usage]]] = {}
    for view in views:
        for member, daily in view.member_tokens.items():
            week = shown.on_days(daily, days)
            if week != Usage():
                members.setdefault(clean_line(member, NAME_MOST), []).append(
                    (view, week, shown.on_days(daily, days[-1:])))
    rows = []
    for member, spent in members.items():
        week = sum((w for _, w, _ in spent), Usage())
        today = sum((t for _, _, t in spent), Usage())
        rows.append({
            "member": member,
            "tokensLast7Days": week.as_fields(), "cacheShareLast7Days": _share(week),
            "tokensToday": today.as_fields(),
            "keys": [{"index": v.index, "name": v.name, "maskedKey": v.masked_key,
                      "tokensLast7Days": w.as_fields(), "tokensToday": t.as_fields()} for v, w, t in spent],
        })
    rows.sort(key=lambda row: -row["tokensLast7Days"]["input"])  # type: ignore[index]
    return rows


def by_member_page(views: Sequence[KeyView], now: int) -> str:
    """What `stats --by-member` prints."""
    rows = by_member(views, now)
    if not rows:
        return "No tokens counted per member in the last 7 days (counted by proxies on a team store)."
    lines = ["👥 Tokens by member, last 7 days (UTC)"]
    for row in rows:
        week, today = (Usage.from_fields(row[name]) or Usage() for name in ("tokensLast7Days", "tokensToday"))
        lines += ["", str(row["member"]), f"   Last 7 Days: {shown.summary(week)}", f"   Today: {shown.summary(today)}"]
        for key in row["keys"]:  # type: ignore[attr-defined]
            spent = Usage.from_fields(key["tokensLast7Days"]) or Usage()
            lines.append(f"   [{key['index']}] {key['name']}: {shown.summary(spent)}")
    return "\n".join(lines)
