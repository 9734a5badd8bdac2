"""Reading Kimi's quota endpoint, `GET /coding/v1/usages`, for a window's exact reset.

The answer lists the plan's windows: `usage` is the weekly one, `limits[]` the shorter
ones, each `{"window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
"detail": {"resetTime": ...}}`. Numbers may arrive as strings. Asking costs no tokens.
"""

from __future__ import annotations

import json
from typing import Any

from rotator.policy import Window
from rotator.reset_times import parse_reset_time

USAGES_PATH = "/coding/v1/usages"

_UNIT_MINUTES = {
    "TIME_UNIT_MINUTE": 1,
    "TIME_UNIT_HOUR": 60,
    "TIME_UNIT_DAY": 24 * 60,
    "TIME_UNIT_WEEK": 7 * 24 * 60,
}
_WINDOW_MINUTES = {Window.FIVE_HOUR: 5 * 60, Window.WEEKLY: 7 * 24 * 60}


def window_reset(body: bytes | str, window: Window, now_ms: int) -> int | None:
    """The reset moment of `window` in a /usages answer, or None if it doesn't say."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or window not in _WINDOW_MINUTES:
        return None
    wanted = _WINDOW_MINUTES[window]
    for entry in _as_list(document.get("limits")):
        if _window_minutes(entry.get("window")) == wanted:
            return _reset_of(entry.get("detail"), now_ms)
    if window is Window.WEEKLY:
        return _reset_of(document.get("usage"), now_ms)
    return None


def _as_list(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _window_minutes(window: Any) -> int | None:
    if not isinstance(window, dict):
        return None
    try:
        duration = int(str(window.get("duration")))
    except ValueError:
        return None
    unit = _UNIT_MINUTES.get(str(window.get("timeUnit")))
    return None if unit is None else duration * unit


def _reset_of(detail: Any, now_ms: int) -> int | None:
    if not isinstance(detail, dict) or detail.get("resetTime") is None:
        return None
    return parse_reset_time(detail["resetTime"], now_ms)
