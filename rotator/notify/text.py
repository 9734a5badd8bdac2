"""Text in notifications: outside text cleaned, key-shaped strings masked, moments written.

A notification leaves this machine for a desktop, a phone or a chat, so nothing in it
may be a key or act on a terminal. The cleaning is the log's (`rotator.core.text`), with
a URL's password masked too (a reason may quote a channel's URL).
"""

from __future__ import annotations

import re
from datetime import datetime, tzinfo

from rotator.core.key_view import format_duration as duration  # the one way a duration is written
from rotator.core.text import ELLIPSIS, cap, clean_line

MS_PER_SECOND = 1000
DAY_MS = 24 * 60 * 60 * MS_PER_SECOND
# Further ahead than this, a weekday alone is ambiguous (next Thursday or the one after?).
WEEKDAY_ONLY_WITHIN_MS = 6 * DAY_MS

# A password in a URL: `redis://user:PASSWORD@host`, `json://user:PASSWORD@host`.
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*):[^@/\s]+@")

__all__ = ["ELLIPSIS", "cap", "clean", "clean_body", "clock_time", "duration", "when"]


def clean(text: str, most: int) -> str:
    """Outside text as one printable line of at most `most` characters, keys and URL
    passwords masked (`rotator.core.text.clean_line`, the log's cleaning)."""
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{ELLIPSIS}@", text)
    return clean_line(text, most)


def clean_body(text: str, most: int) -> str:
    """A body this package laid out: each line cleaned (keys masked once more), breaks
    kept, the whole cut to `most` characters."""
    return cap("\n".join(clean(line, most) for line in text.split("\n")), most)


def clock_time(moment_ms: int, now_ms: int, tz: tzinfo | None = None) -> str:
    """`Thu 14:05` in `tz` (the machine's local zone when None); the date is added when
    the moment is six days or more away, where a weekday alone could mean two days."""
    moment = datetime.fromtimestamp(moment_ms / MS_PER_SECOND, tz)
    if abs(moment_ms - now_ms) >= WEEKDAY_ONLY_WITHIN_MS:
        return moment.strftime("%a %d %b %H:%M")
    return moment.strftime("%a %H:%M")


def when(moment_ms: int, now_ms: int, tz: tzinfo | None = None) -> str:
    """`Thu 14:05 (in 2d 3h)`; a moment already past reads `Thu 14:05 (now)`."""
    if moment_ms <= now_ms:
        return f"{clock_time(moment_ms, now_ms, tz)} (now)"
    return f"{clock_time(moment_ms, now_ms, tz)} (in {duration(moment_ms - now_ms)})"
