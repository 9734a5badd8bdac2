"""Writing lines to a terminal: cleaned and masked (`text.clean_lines`), and in a form
the stream's encoding can carry (plain-ASCII stand-ins for the glyphs otherwise)."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rotator.core.text import clean_lines

# Fallbacks for terminals whose encoding can't show the glyphs.
ASCII_GLYPHS = str.maketrans(
    {
        "●": "*",
        "○": "o",
        "█": "#",
        "░": "-",
        "✓": "+",
        "✗": "x",
        "⏳": "~",
        "⚠": "!",
        "…": "...",
        "—": "-",
        "─": "-",
        "→": "->",
        "·": ".",
        "📊": "",
        "📈": "",
        **{bar: str(level + 1) for level, bar in enumerate("▁▂▃▄▅▆▇")},
    }
)


def _can_encode(stream: TextIO, text: str) -> bool:
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def emit(stream: TextIO, text: str) -> None:
    """Write one or more lines, clean and masked, in a form the stream's encoding can carry."""
    text = clean_lines(text)
    if not _can_encode(stream, text):
        text = text.translate(ASCII_GLYPHS)
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            text = text.encode(encoding, "replace").decode(encoding)
        except LookupError:
            text = text.encode("ascii", "replace").decode("ascii")
    stream.write(text + "\n")
    stream.flush()


def stdout_to_devnull() -> None:
    """After a reader went (`| head`): so that Python's own flush of stdout at exit does
    not fail again (the recipe in the signal module's documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (tests capture it): nothing to flush
        pass
