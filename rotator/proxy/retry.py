"""Retrying a refused request on other keys, within one deadline for the whole request.

The loop knows the wait line (and through it the pool), a way to send one attempt, and
the request's deadline; the clock is the pool's and the sending is injected, so tests run
it with a fake clock and a fake sender, no proxy needed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from rotator.core.policy import Outcome
from rotator.core.strategies import Unavailable
from rotator.pool.lease import Lease
from rotator.pool.waitline import Abandoned, Gone, WaitLine, never_gone

DEFAULT_MAX_ATTEMPTS = 5

SendAttempt = Callable[[Lease], Awaitable[Outcome]]


def max_attempts(configured: int, key_count: int) -> int:
    """Attempts per request: as configured, or (0) every key once plus one on whichever
    frees up first within the wait, at most DEFAULT_MAX_ATTEMPTS."""
    if configured > 0:
        return configured
    return max(1, min(DEFAULT_MAX_ATTEMPTS, key_count + 1))


async def retry_elsewhere(
    line: WaitLine,
    send: SendAttempt,
    *,
    tried: set[str],
    attempts_made: int,
    most_attempts: int,
    deadline_ms: int,
    gone: Gone = never_gone,
) -> Unavailable | Abandoned | None:
    """Send the request again with other keys until one answers without a key fault.

    `tried` holds the keys already used for this request (it grows). None: the last
    attempt's answer stands. Unavailable: no key could serve in time, and the client
    should be told why and when one will. ABANDONED: the client left (`gone()`), so
    nothing more was sent.
    """
    attempts = attempts_made
    while attempts < most_attempts:
        lease = await line.acquire(deadline_ms, tried, gone)
        if not isinstance(lease, Lease):
            return lease
        tried.add(lease.key)
        attempts += 1
        outcome = await send(lease)
        if not outcome.retry_elsewhere:
            return None
    # Out of attempts, every one refused: if no key can serve now, say when one can.
    pool = line.pool
    available = pool.peek(pool.clock.now_ms())
    return available if isinstance(available, Unavailable) else None
