"""The one cleaning of outside text (upstream answers, the accounts file, the command
line) before it is kept, logged or shown: control text out, length capped, keys masked.

Outside text is anything this program did not write itself. It may hold what a terminal
acts on (C0/C1 controls, ANSI and OSC escape sequences such as OSC 52 clipboard
writes, bidi overrides that reorder what is shown), lone UTF-16 surrogates (half an
emoji from `JSON.stringify`, or undecodable command-line bytes) that no UTF-8 file can
hold, huge strings, and keys. `clean_line` makes it one short printable line;
`clean_lines` does the same but keeps line breaks, for text this program laid out
itself; `refusal` says why a person's input should be refused instead of cleaned.
"""

from __future__ import annotations

import re

from rotator.core.keys import scrub

NAME_MOST = 100  # characters in a key's name
REASON_MOST = 300  # characters in why a key is disabled or cooling
ELLIPSIS = "…"
REPLACEMENT = "\ufffd"  # what a lone surrogate becomes: something was there

# Whole escape sequences go, not just their ESC: "\x1b[31m" must not leave "[31m".
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"  # CSI: colours, cursor moves, erase screen
    r"|\x1b\][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC: titles, links, clipboard (52)
    r"|\x1b[PX^_][^\x1b\x9c]*(?:\x1b\\|\x9c)?"  # DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]?"  # the other ESC sequences (charset, keypad, ...)
    r"|\x9b[0-?]*[ -/]*[@-~]?"  # 8-bit CSI
    r"|[\x90\x98\x9d-\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # 8-bit OSC, DCS, ...
)
# Line breaks of every kind: a space in one line, a break in several.
_BREAKS = "\n\r\x0b\x0c\x85\u2028\u2029"
# Other controls, bidi embeddings/overrides/isolates and marks, and what shows as
# nothing or as a blank: soft hyphen, invisible operators, Hangul fillers,
# interlinear annotation marks, tag characters (which can spell hidden text). The
# joiners U+200C/U+200D stay: emoji sequences and several scripts need them.
_INVISIBLE = (
    "\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\xad"
    "\u061c\u115f\u1160\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069"
    "\u3164\ufeff\uffa0\ufff9-\ufffb\U000e0000-\U000e007f"
)
_DROP_IN_LINE = re.compile(f"[{_INVISIBLE}]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAKS = re.compile(f"[\t{_BREAKS}]+")
_ANY_BREAK = re.compile(f"\r\n|[{_BREAKS}]")
_BAD_IN_LINE = re.compile(f"[\x1b\t{_BREAKS}{_INVISIBLE}\ud800-\udfff]")
_BAD_IN_LINES = re.compile(f"[\x1b\t\r\x0b\x0c\x85\u2028\u2029{_INVISIBLE}\ud800-\udfff]")


def _strip(text: str) -> str:
    """`text` without escape sequences and invisible controls, surrogates replaced."""
    text = _ESCAPE_SEQUENCE.sub("", text)
    text = _DROP_IN_LINE.sub("", text)
    return _SURROGATE.sub(REPLACEMENT, text)


def cap(text: str, most: int) -> str:
    """`text` cut to at most `most` characters, an ellipsis saying it was cut."""
    if len(text) <= most:
        return text
    return text[: max(0, most - 1)].rstrip() + ELLIPSIS


def clean_line(text: str, most: int) -> str:
    """One printable line of at most `most` characters, with every key-shaped string masked.

    Escape sequences and invisible controls are dropped, each run of line breaks and
    tabs becomes one space, lone surrogates become U+FFFD, the ends are trimmed.
    Masking comes before the cut, so a cut never leaves part of a key unmasked.
    """
    if len(text) <= most and "sk-" not in text and not _BAD_IN_LINE.search(text):
        return text.strip()  # the common case: nothing to clean
    text = _LINE_BREAKS.sub(" ", _strip(text)).strip()
    return cap(scrub(text), most)


def clean_lines(text: str) -> str:
    """`clean_line` for text of several lines this program laid out: breaks kept
    (any kind becomes "\\n"), tabs become spaces, no cut."""
    if "sk-" not in text and not _BAD_IN_LINES.search(text):
        return text
    text = _ANY_BREAK.sub("\n", _strip(text)).replace("\t", " ")
    return scrub(text)


def refusal(text: str, most: int) -> str | None:
    """Why `text`, typed by a person, should be refused rather than cleaned; None if fine.

    One short phrase that shows none of the offending text itself.
    """
    if _SURROGATE.search(text):
        return "is not valid UTF-8 text (check your terminal's character encoding)"
    found = _BAD_IN_LINE.search(text)
    if found:
        return f"contains a control character (U+{ord(found.group(0)):04X}); use printable text on one line"
    if len(text) > most:
        return f"is {len(text)} characters long; at most {most} are allowed"
    return None
