"""A key's quota as Kimi's `GET /coding/v1/usages` reports it, and what the pool does with it.

The answer lists the plan's windows: the top-level `usage` (the weekly one) and each
`limits[]` entry (`{"window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
"detail": {"limit", "used", "remaining", "resetTime"}}`), plus `parallel.limit`, the
requests one key may have in flight. Numbers may arrive as strings. Asking costs no
tokens. A reading is kept per key in the accounts file (`Account.quota`, optional, so
the plugin still reads the file); the newest reading wins a merge.

A window with no quota left (remaining at or below `reserve_percent` of its limit) makes
the key cool until the window resets, before Kimi refuses it: `steer` says until when
and why, and the pool turns that into an ordinary cooldown every view already shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from rotator.core.policy import Window
from rotator.core.reset_times import parse_reset_time

USAGES_PATH = "/coding/v1/usages"
DEFAULT_RESERVE_PERCENT = 1.0
FIVE_HOUR_MINUTES = 5 * 60
WEEK_MINUTES = 7 * 24 * 60
# Readings are kept to the windows a plan can have; an answer listing more is odd.
MOST_WINDOWS = 8

_UNIT_MINUTES = {
    "TIME_UNIT_MINUTE": 1,
    "TIME_UNIT_HOUR": 60,
    "TIME_UNIT_DAY": 24 * 60,
    "TIME_UNIT_WEEK": 7 * 24 * 60,
}
_CONFIG = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class QuotaWindow(BaseModel):
    """One window of a plan: `minutes` long, `used` of `limit`, resetting at `reset_time`
    (ms since the epoch; 0 when Kimi did not say). Unknown numbers are None."""

    model_config = _CONFIG

    minutes: int | None = None
    limit: int | None = Field(default=None, ge=0)
    used: int | None = Field(default=None, ge=0)
    remaining: int | None = Field(default=None, ge=0)
    reset_time: int = Field(default=0, ge=0)

    @property
    def name(self) -> str:
        return window_name(self.minutes)

    @property
    def left(self) -> int | None:
        """What is left: `remaining` as reported, else limit minus used."""
        if self.remaining is not None:
            return self.remaining
        if self.limit is not None and self.used is not None:
            return max(0, self.limit - self.used)
        return None

    def remaining_ratio(self) -> float | None:
        """What is left of the limit, 0.0 to 1.0; None when unknown."""
        left = self.left
        if left is None or not self.limit:
            return None
        return max(0.0, min(1.0, left / self.limit))

    def is_spent(self, reserve_percent: float) -> bool:
        left = self.left
        if left is None or self.limit is None:
            return False
        if self.limit == 0:
            return True
        return left <= self.limit * reserve_percent / 100


class QuotaReading(BaseModel):
    """The latest `/usages` answer for one key, as kept in the accounts file."""

    model_config = _CONFIG

    taken_at: int = Field(default=0, ge=0)
    windows: list[QuotaWindow] = Field(default_factory=list, max_length=MOST_WINDOWS)
    parallel_limit: int | None = Field(default=None, ge=1)


def window_name(minutes: int | None) -> str:
    """`5-hour`, `weekly`, `30-minute`, `2-day`: how a window is named everywhere."""
    if minutes is None:
        return "unnamed"
    if minutes == WEEK_MINUTES:
        return "weekly"
    if minutes % (24 * 60) == 0:
        return f"{minutes // (24 * 60)}-day"
    if minutes % 60 == 0:
        return f"{minutes // 60}-hour"
    return f"{minutes}-minute"


# -- reading an answer ------------------------------------------------------------------

def parse_usages(body: bytes | str, now_ms: int) -> QuotaReading | None:
    """The reading in a /usages answer, or None if it is not one (not JSON, no windows
    and no parallel limit). Odd numbers (negative, not numbers) read as unknown."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    windows = []
    for entry in _as_list(document.get("limits"))[:MOST_WINDOWS - 1]:
        window = _window(entry.get("detail"), _window_minutes(entry.get("window")), now_ms)
        if window is not None:
            windows.append(window)
    weekly = _window(document.get("usage"), WEEK_MINUTES, now_ms)
    if weekly is not None and not any(w.minutes == WEEK_MINUTES for w in windows):
        windows.append(weekly)
    parallel = document.get("parallel")
    parallel_limit = _count(parallel.get("limit")) if isinstance(parallel, dict) else None
    if not windows and not parallel_limit:
        return None
    windows.sort(key=lambda w: (w.minutes is None, w.minutes or 0))
    return QuotaReading(taken_at=now_ms, windows=windows, parallel_limit=parallel_limit or None)


def _as_list(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _window_minutes(window: Any) -> int | None:
    if not isinstance(window, dict):
        return None
    duration = _count(window.get("duration"))
    unit = _UNIT_MINUTES.get(str(window.get("timeUnit")))
    if duration is None or unit is None or duration == 0:
        return None
    return duration * unit


def _window(detail: Any, minutes: int | None, now_ms: int) -> QuotaWindow | None:
    if not isinstance(detail, dict):
        return None
    limit, used, remaining = (_count(detail.get(name)) for name in ("limit", "used", "remaining"))
    reset = detail.get("resetTime")
    reset_ms = parse_reset_time(reset, now_ms) if reset is not None else None
    if limit is None and used is None and remaining is None and not reset_ms:
        return None
    return QuotaWindow(minutes=minutes, limit=limit, used=used, remaining=remaining, reset_time=reset_ms or 0)


_MOST_COUNT = 10**15  # beyond any plan; keeps a hostile number from becoming a huge int


def _count(value: Any) -> int | None:
    """A whole number 0 or more from a number or numeric string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return min(int(value), _MOST_COUNT)


_REFUSED_WINDOW_MINUTES = {Window.FIVE_HOUR: FIVE_HOUR_MINUTES, Window.WEEKLY: WEEK_MINUTES}


def window_reset(reading: QuotaReading | None, window: Window) -> int | None:
    """The reset moment of the plan window a refusal named, if the reading has it."""
    minutes = _REFUSED_WINDOW_MINUTES.get(window)
    if reading is None or minutes is None:
        return None
    for found in reading.windows:
        if found.minutes == minutes and found.reset_time:
            return found.reset_time
    return None


# -- steering by it --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SpentWindow:
    """A window with no quota left: the key cools until `until_ms`, for `reason`."""

    until_ms: int
    reason: str
    window: QuotaWindow


def spent_reason(window: QuotaWindow) -> str:
    used = "" if window.used is None or window.limit is None else f" ({window.used} of {window.limit} used)"
    return f"{window.name} quota spent{used}, per Kimi's /usages"


def steer(reading: QuotaReading | None, reserve_percent: float, now_ms: int) -> SpentWindow | None:
    """The spent window that keeps the key out longest, or None if every window has quota
    left (or resets have passed: the reading is then out of date, not the key spent)."""
    if reading is None:
        return None
    worst: QuotaWindow | None = None
    for window in reading.windows:
        if window.reset_time > now_ms and window.is_spent(reserve_percent):
            if worst is None or window.reset_time > worst.reset_time:
                worst = window
    if worst is None:
        return None
    return SpentWindow(worst.reset_time, spent_reason(worst), worst)


def parallel_cap(reading: QuotaReading | None, max_in_flight: int) -> int:
    """A key's in-flight cap: the lower of Kimi's parallel limit and the proxy's own."""
    if reading is None or reading.parallel_limit is None:
        return max_in_flight
    return min(max_in_flight, reading.parallel_limit)
