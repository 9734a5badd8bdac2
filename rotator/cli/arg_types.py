"""The CLI's arguments as argparse types: a key's index, a key named by index, name or
masked key, true/false, cooldown minutes; each error says what was expected."""

from __future__ import annotations

import argparse
import re

INDEX_SHAPE = re.compile(r"[0-9]+")


def parse_index(text: str) -> int:
    """A key's position in the file: a whole number, 0 or more."""
    if not INDEX_SHAPE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"index must be a whole number 0 or more, got {text!r}")
    return int(text)


def target_or_all(text: str) -> int | str:
    return "all" if text.lower() == "all" else key_target(text)


def key_target(text: str) -> int | str:
    """A verb's key: an index, else a name or masked key (`ops.names`)."""
    return parse_index(text) if INDEX_SHAPE.fullmatch(text) else text


def key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="INDEX|NAME|KEY", type=key_target,
                        help="the key's index, its name, or its masked key (sk-kim...abcd) as list-keys shows")


def true_or_false(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r} (when true, resting keys"
                                         " regain health after each cooldown period)")
    return text == "true"


def cooldown_minutes(text: str) -> int:
    if not INDEX_SHAPE.fullmatch(text) or not 1 <= int(text) <= 1440:
        raise argparse.ArgumentTypeError(f"MINUTES must be a whole number from 1 to 1440, got {text!r} (the"
                                         " rest per +10 health after a rate limit; default 30)")
    return int(text)
