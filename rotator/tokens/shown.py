"""How token counts read to a person: short figures (48.2k, 1.3M), the cache share as a
percentage, and the one-line note a flow's comment ends with."""

from __future__ import annotations

from rotator.tokens.usage import Usage


def short(count: int) -> str:
    """`count` in at most five characters or so: 612, 48.2k, 1.3M, 2.0G."""
    if count < 1000:
        return str(count)
    for size, unit in ((1_000_000_000, "G"), (1_000_000, "M"), (1000, "k")):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)  # not reached


def share(usage: Usage) -> str:
    """The cache share (cache reads / all input) as a whole percentage, "-" without input."""
    part = usage.cache_share
    return "-" if part is None else f"{part * 100:.0f}%"


def note(usage: Usage) -> str:
    """The answer's tokens, as a flow's comment ends: `in 48.2k (cached 41.0k) · out 612`."""
    cached = f" (cached {short(usage.cache_read)})" if usage.cache_read else ""
    return f"in {short(usage.input)}{cached} · out {short(usage.output)}"
