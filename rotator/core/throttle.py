"""Telling Kimi throttling this client apart from one key's rate limit.

Rate limits on `THROTTLE_KEYS` different keys within `THROTTLE_WINDOW_MS` look like Kimi
throttling the client (its IP or account), not like each key's fault: the pool then
pauses every key for `PAUSE_MS` instead, and refunds what the burst charged to keys.
`RecentLimits` remembers the charges that may have to be refunded; the pool applies them.
On a team store, the rate limits other proxies saw count too (each proxy sees only part
of a burst), though only this proxy's own charges are refunded here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

THROTTLE_KEYS = 3
THROTTLE_WINDOW_MS = 5_000
PAUSE_MS = 10_000


@dataclass(frozen=True, slots=True)
class RecentLimit:
    """A rate limit charged to a key, and what the key was before it."""

    at_ms: int
    key: str
    previous_deadline: int
    previous_level: int
    previous_health: int
    charged: bool = True  # False: another proxy saw it (a team store); nothing to refund here


@dataclass(slots=True)
class RecentLimits:
    limits: list[RecentLimit] = field(default_factory=list)

    def remember(self, limit: RecentLimit) -> None:
        self.limits.append(limit)

    def burst(self, key: str, now_ms: int) -> list[RecentLimit] | None:
        """None: charge this rate limit of `key` to it. Otherwise it completes a burst
        across keys: the earlier charges in it, to refund (forgotten here)."""
        window_start = now_ms - THROTTLE_WINDOW_MS
        recent = [r for r in self.limits if r.at_ms >= window_start and r.key != key]
        if len({r.key for r in recent}) + 1 < THROTTLE_KEYS:
            self.limits = recent
            return None
        self.limits = []
        return recent

    def take_charged(self, now_ms: int) -> list[RecentLimit]:
        """This proxy's charges still in the window, forgotten here: the team paused for
        a throttle they were part of."""
        window_start = now_ms - THROTTLE_WINDOW_MS
        charged = [r for r in self.limits if r.at_ms >= window_start and r.charged]
        self.limits = []
        return charged


def pause_line(recent: list[RecentLimit]) -> str:
    limited_keys = len({r.key for r in recent}) + 1
    return (
        f"{limited_keys} keys rate limited within {THROTTLE_WINDOW_MS // 1000} s: Kimi is "
        f"throttling this client, not a key; pausing all keys for {PAUSE_MS // 1000} s "
        "instead of cooling each one"
    )
