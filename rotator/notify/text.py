"""Text in notifications: outside text cleaned, key-shaped strings masked, moments written.

A notification leaves this machine for a desktop, a phone or a chat, so nothing in it
may be a key or act on a terminal. The cleaning is the log's (rotator.text: the same
escape-sequence and invisible-character sets), copied here because this package imports
nothing from the rest of rotator; the two should be folded into one when it is wired in.
"""

from __future__ import annotations

import re
from datetime import datetime, tzinfo

ELLIPSIS = "…"
REPLACEMENT = "\ufffd"
MS_PER_SECOND = 1000
DAY_MS = 24 * 60 * 60 * MS_PER_SECOND
# Further ahead than this, a weekday alone is ambiguous (next Thursday or the one after?).
WEEKDAY_ONLY_WITHIN_MS = 6 * DAY_MS

# Whole escape sequences go, not just their ESC: "\x1b[31m" must not leave "[31m".
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"  # CSI: colours, cursor moves, erase screen
    r"|\x1b\][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC: titles, links, clipboard (52)
    r"|\x1b[PX^_][^\x1b\x9c]*(?:\x1b\\|\x9c)?"  # DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]?"  # the other ESC sequences (charset, keypad, ...)
    r"|\x9b[0-?]*[ -/]*[@-~]?"  # 8-bit CSI
    r"|[\x90\x98\x9d-\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # 8-bit OSC, DCS, ...
)
_BREAKS = "\n\r\x0b\x0c\x85\u2028\u2029"
# Other controls, bidi embeddings/overrides/isolates, and what shows as nothing.
_INVISIBLE = (
    "\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\xad"
    "\u061c\u115f\u1160\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069"
    "\u3164\ufeff\uffa0\ufff9-\ufffb\U000e0000-\U000e007f"
)
_DROP = re.compile(f"[{_INVISIBLE}]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAKS = re.compile(f"[\t{_BREAKS}]+")
# A password in a URL: `redis://user:PASSWORD@host`, `json://user:PASSWORD@host`.
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*):[^@/\s]+@")
# Kimi's keys (even a fragment) and any other provider's sk- key.
_KEY_LIKE = re.compile(r"sk-kimi-[A-Za-z0-9_\-]+|sk-[A-Za-z0-9_.\-]{8,}")


def mask_key(key: str) -> str:
    """`sk-kim…abcd`, as rotator.keys.mask_key shows a key."""
    if len(key) <= 12:
        return ELLIPSIS + key[-2:] if len(key) > 4 else ELLIPSIS
    return f"{key[:6]}{ELLIPSIS}{key[-4:]}"


def scrub(text: str) -> str:
    """`text` with anything shaped like a key replaced by its masked form, and a URL's
    password by an ellipsis."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{ELLIPSIS}@", text)
    return _KEY_LIKE.sub(lambda m: mask_key(m.group(0)), text)


def cap(text: str, most: int) -> str:
    """`text` cut to at most `most` characters, an ellipsis saying it was cut."""
    if len(text) <= most:
        return text
    return text[: max(0, most - 1)].rstrip() + ELLIPSIS


def clean(text: str, most: int) -> str:
    """Outside text as one printable line of at most `most` characters, keys (and URL
    passwords) masked.

    Escape sequences and invisible controls are dropped, each run of line breaks and
    tabs becomes one space, lone surrogates become U+FFFD. Masking comes before the cut,
    so a cut never leaves part of a key unmasked."""
    text = _ESCAPE_SEQUENCE.sub("", text)
    text = _SURROGATE.sub(REPLACEMENT, _DROP.sub("", text))
    return cap(scrub(_LINE_BREAKS.sub(" ", text).strip()), most)


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


def duration(ms: int) -> str:
    """`4m 12s`, `45s`, `2h 05m`, `3d 4h` (rotator.status.format_duration's form),
    rounded up so it never shows 0s while something is still ahead."""
    seconds = max(0, -(-ms // MS_PER_SECOND))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def when(moment_ms: int, now_ms: int, tz: tzinfo | None = None) -> str:
    """`Thu 14:05 (in 2d 3h)`; a moment already past reads `Thu 14:05 (now)`."""
    if moment_ms <= now_ms:
        return f"{clock_time(moment_ms, now_ms, tz)} (now)"
    return f"{clock_time(moment_ms, now_ms, tz)} (in {duration(moment_ms - now_ms)})"
