"""A key's usage statistics: what a success adds to them, and the numbers `stats` shows.

The fields are the TypeScript plugin's: `responseTimes` (ms from sending the request to
the answer's headers, the newest 100) and `dailyRequests` (successes per UTC date,
`YYYY-MM-DD` as JavaScript's `toISOString()` writes it; days older than 90 dropped when
saved). Recording a success is on the proxy's hot path: a dict increment and a bounded
list append, with the date string made once per day (`utc_day`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rotator.core.models import Account

if TYPE_CHECKING:
    from rotator.core.merge import KeyChange

RESPONSE_TIMES_KEPT = 100
DAYS_KEPT = 90
WEEK_DAYS = 7
DAY_MS = 86_400_000
_DATE_SHAPE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

_day_cache: tuple[int, str] = (-1, "")


def utc_day(now_ms: int) -> str:
    """The UTC date of `now_ms`, `YYYY-MM-DD`; computed once per day number."""
    global _day_cache
    number = now_ms // DAY_MS
    cached = _day_cache
    if cached[0] == number:
        return cached[1]
    text = time.strftime("%Y-%m-%d", time.gmtime(number * (DAY_MS // 1000)))
    _day_cache = (number, text)
    return text


def last_days(now_ms: int, count: int = WEEK_DAYS) -> list[str]:
    """The UTC dates of today and the `count - 1` days before it, oldest first."""
    return [utc_day(now_ms - back * DAY_MS) for back in range(count - 1, -1, -1)]


def response_ms(request_end_s: float | None, headers_s: float | None, chosen_ms: int = 0) -> int | None:
    """Whole ms from sending a request to its answer's headers, from mitmproxy's
    timestamps (seconds): the request was sent once read whole, or, if it waited for a
    key, once the key was chosen at `chosen_ms` (used only when it falls between the
    two). None when a timestamp is missing."""
    if not request_end_s or not headers_s:
        return None
    sent = request_end_s
    chosen_s = chosen_ms / 1000
    if sent < chosen_s <= headers_s:
        sent = chosen_s
    return max(0, round((headers_s - sent) * 1000))


def record_success(account: Account, change: KeyChange, took_ms: int | None, now_ms: int) -> bool:
    """Count a success on `account` and in its change record. Returns whether it ended
    a half-open cooldown (the key is back to full traffic)."""
    # Written as pydantic's __setattr__ would (Account does not validate assignment),
    # without its two Python calls, on every success.
    account.__dict__["successful_requests"] += 1
    account.__pydantic_fields_set__.add("successful_requests")
    change.add("successful_requests", 1, now_ms)
    if account.consecutive_failures:
        account.consecutive_failures = 0
    change.set("consecutive_failures", 0, now_ms)
    if account.consecutive_billing_limit_hits:
        account.consecutive_billing_limit_hits = 0
        change.set("consecutive_billing_limit_hits", 0, now_ms)
    cached = _day_cache
    day = cached[1] if cached[0] == now_ms // DAY_MS else utc_day(now_ms)
    daily = account.daily_requests
    daily[day] = daily.get(day, 0) + 1
    change.count_day("daily_requests", day, now_ms)
    if took_ms is not None:
        times = account.response_times
        times.append(took_ms)
        if len(times) > RESPONSE_TIMES_KEPT:
            del times[0]
        change.append_newest("response_times", took_ms, now_ms)
    if account.cooldown_level:
        account.cooldown_level = 0
        change.set("cooldown_level", 0, now_ms)
        return True
    return False


def drop_old_days(daily: dict[str, Any], now_ms: int) -> None:
    """Forget dates more than `DAYS_KEPT` days before `now_ms` (other entries stay)."""
    if len(daily) <= DAYS_KEPT:
        return
    oldest = utc_day(now_ms - DAYS_KEPT * DAY_MS)
    for day in [d for d in daily if _DATE_SHAPE.fullmatch(d) and d < oldest]:
        del daily[day]


@dataclass(frozen=True, slots=True)
class KeyStats:
    """The numbers `stats` shows for one key (or, with index None, for all of them)."""

    total: int
    successful: int
    failed: int
    success_rate: float | None  # percent; None before any request
    average_ms: int | None
    min_ms: int | float | None
    max_ms: int | float | None
    today: int
    week: tuple[tuple[str, int], ...]  # (date, successes), oldest first, today last

    @property
    def last_7_days(self) -> int:
        return sum(count for _, count in self.week)


def _average(times: Sequence[int | float]) -> int | None:
    # JavaScript's Math.round: halves round up.
    return int(sum(times) / len(times) + 0.5) if times else None


def success_rate(total: int, successful: int) -> float | None:
    """Successes per request in percent, one decimal; None before any request. At most 100:
    a file counted wrongly or edited by hand can hold more successes than requests."""
    if total <= 0:
        return None
    return round(min(successful, total) / total * 100, 1)


def key_stats(
    total: int, successful: int, times: Sequence[int | float], daily: Mapping[str, int], now_ms: int
) -> KeyStats:
    week = tuple((day, int(daily.get(day, 0))) for day in last_days(now_ms))
    return KeyStats(
        total=total,
        successful=successful,
        failed=max(0, total - successful),
        success_rate=success_rate(total, successful),
        average_ms=_average(times),
        min_ms=min(times) if times else None,
        max_ms=max(times) if times else None,
        today=week[-1][1],
        week=week,
    )
