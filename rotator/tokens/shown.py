"""How token counts read to a person: short figures (48.2k, 1.3M), the cache share as a
percentage, and the one-line note a flow's comment ends with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rotator.tokens.usage import Usage


def short(count: int) -> str:
    """`count` in at most five characters or so: 612, 48.2k, 1.3M, 2.0G."""
    if count < 1000:
        return str(count)
    if count < 1_000_000:
        return f"{count / 1000:.1f}k"
    if count < 1_000_000_000:
        return f"{count / 1_000_000:.1f}M"
    return f"{count / 1_000_000_000:.1f}G"


def share(usage: Usage) -> str:
    """The cache share (cache reads / all input) as a whole percentage, "-" without input."""
    part = usage.cache_share
    return "-" if part is None else f"{part * 100:.0f}%"


def note(usage: Usage) -> str:
    """The answer's tokens, as a flow's comment ends: `in 48.2k (cached 41.0k) · out 612`."""
    cached = f" (cached {short(usage.cache_read)})" if usage.cache_read else ""
    return f"in {short(usage.input)}{cached} · out {short(usage.output)}"


def saved(fields: object) -> Usage:
    """A saved total (`{input, output, cacheRead, cacheWrite}`) as a Usage; an odd one
    (edited by hand) as nothing."""
    return Usage.from_fields(fields) or Usage()


def on_days(daily: Mapping[str, object], days: Iterable[str]) -> Usage:
    """The saved per-day totals (`dailyTokens`) of `days`, added up."""
    total = Usage()
    for day in days:
        found = daily.get(day)
        if found is not None:
            total += saved(found)
    return total


def summary(usage: Usage) -> str:
    """A total for a person: `in 1.2M · out 30.1k · cache read 1.0M (85%) · cache write 300`."""
    return (f"in {short(usage.input)} · out {short(usage.output)} · cache read {short(usage.cache_read)}"
            f" ({share(usage)}) · cache write {short(usage.cache_write)}")
