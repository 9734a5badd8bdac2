"""The one sanitiser of outside text (`rotator.core.text`) and the reasons policy builds with it."""

from __future__ import annotations

import pytest

from rotator.core import policy
from rotator.core.text import clean_line, clean_lines, refusal

KEY = "sk-kimi-" + "Q" * 40


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("plain text", "plain text"),
        ("Café ☕ 東京 🚀", "Café ☕ 東京 🚀"),
        ("two\nlines\r\nand\u2028more", "two lines and more"),
        ("\x1b[31mred\x1b[0m", "red"),
        ("title\x1b]0;pwned\x07 after", "title after"),
        ("clip\x1b]52;c;aGVsbG8=\x1b\\ after", "clip after"),
        ("bell\x07 nul\x00 del\x7f c1\x85x", "bell nul del c1 x"),
        ("8-bit csi \x9b2Jdone", "8-bit csi done"),
        ("evil\u202etxt.exe \u2066iso\u2069", "eviltxt.exe iso"),
        ("half \ud83d emoji \udfff", "half \ufffd emoji \ufffd"),
        (f"echo {KEY} back", "echo sk-kim…QQQQ back"),
        (f"split sk-kimi-QQQQ\x1b[0m{'Q' * 20}", "split sk-kim…QQQQ"),
        ("  padded  ", "padded"),
    ],
)
def test_clean_line(raw: str, clean: str) -> None:
    assert clean_line(raw, 200) == clean


def test_clean_line_caps_after_masking() -> None:
    cleaned = clean_line("x" * 50 + " " + KEY + " " + "y" * 10_000, 80)
    assert len(cleaned) == 80 and cleaned.endswith("…")
    assert "sk-kimi-" not in cleaned  # the key was masked before the cut


def test_clean_lines_keeps_breaks_only() -> None:
    assert clean_lines("a\r\nb\x1b[2J\nc\td\u202e") == "a\nb\nc d"


@pytest.mark.parametrize(
    "typed, why",
    [
        ("Work", None),
        ("Café ☕", None),
        ("Work\nHome", "control character (U+000A)"),
        ("\x1b[31mRed", "control character (U+001B)"),
        ("Work \u202e", "control character (U+202E)"),
        ("Caf\udce9", "not valid UTF-8"),
        ("A" * 101, "is 101 characters long; at most 100"),
    ],
)
def test_refusal(typed: str, why: str | None) -> None:
    found = refusal(typed, 100)
    assert (found is None) if why is None else (found is not None and why in found), found


def test_a_3000_character_hostile_error_type_makes_a_short_clean_reason() -> None:
    body = ('{"type":"error","error":{"type":"' + "t" * 3000
            + '\\n\\u001b[31m\\u25cf [7] Forged ' + KEY + '","message":"who\\nare you ' + KEY + '"}}')
    outcome = policy.classify(401, {}, body.encode(), 0)
    assert outcome.disable
    assert outcome.reason.startswith("HTTP 401: key not accepted: ttt")
    assert len(outcome.reason) <= 300
    assert "\n" not in outcome.reason and "\x1b" not in outcome.reason and KEY not in outcome.reason
    assert outcome.reason.endswith("…: who are you sk-kim…QQQQ")


def test_a_connection_error_is_quoted_clean() -> None:
    outcome = policy.classify_connection_error(f"reset\r\n\x1b[2J by peer {KEY}", 0)
    assert outcome.reason == "connection to Kimi failed: reset by peer sk-kim…QQQQ"


@pytest.mark.parametrize("hidden", ["\u00ad", "\u115f", "\u180e", "\u2061", "\u2064", "\u3164", "\uffa0",
                                    "\ufff9", "\U000e0041", "\U000e007f"])
def test_characters_that_show_as_nothing_are_dropped_and_refused(hidden):
    assert clean_line(f"Work{hidden}Key", 100) == "WorkKey"
    assert refusal(f"Work{hidden}", 100) is not None
    # A key split by one is still masked whole.
    key = "sk-kimi-AAAAAAAA" + hidden + "BBBBBBBBCCCCCCCC1234"
    assert clean_line(f"bad {key}", 100) == "bad sk-kim…1234"


def test_joiners_in_emoji_and_scripts_are_kept():
    name = "Dev \U0001f468\u200d\U0001f4bb"
    assert clean_line(name, 100) == name and refusal(name, 100) is None
