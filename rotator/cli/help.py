"""The CLI's `help` verb as the TypeScript plugin has it: each verb with its arguments,
the strategies, and examples (the verbs themselves are `rotator.cli.main.VERBS`)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

_COMMON_OPTIONS = re.compile(r"\s*\[-h\]|\s*\[--accounts PATH\]|\s*\[--store URL\]|\s*\[--store-prefix PREFIX\]")


def synopsis(verb_parser: argparse.ArgumentParser, prog: str) -> str:
    """`use-key INDEX`: a verb's usage line without the program and the options every verb takes."""
    usage = " ".join(verb_parser.format_usage().split())
    usage = usage.removeprefix("usage:").strip().removeprefix(prog).strip()
    return _COMMON_OPTIONS.sub("", usage).strip()


def help_text(prog: str, verbs: Sequence[tuple[str, str]], options: Sequence[tuple[str, str]] = (),
              epilog: str = "") -> str:
    """The help page, from (synopsis, what it does) per verb and per option."""
    width = max((len(usage) for usage, _ in [*verbs, *options]), default=0) + 2
    return "\n".join([
        "Kimi API Key Rotator (kimi-rotator)",
        "",
        f"Usage: {prog} [--accounts PATH | --store URL] <command> [options]",
        "",
        "Commands:",
        *(f"  {usage.ljust(width)}{text}" for usage, text in verbs),
        "",
        "Strategies:",
        "  round-robin   - Cycle through keys sequentially",
        "  health-based  - Use health scores + idle time (default)",
        "  sticky        - Stay on one key until rate limited",
        "",
        "Examples:",
        f"  {prog} add-key sk-kimi-… MyAccount",
        f"  {prog} list-keys",
        f"  {prog} rotate",
        f"  {prog} use-key 1",
        f"  {prog} stats",
        f"  {prog} usage",
        f"  {prog} refresh-health",
        f"  {prog} set-cooldown 60",
        *(["", "Options (before or after the command):", *(f"  {o.ljust(width)}{text}" for o, text in options)]
          if options else []),
        *(["", epilog] if epilog else []),
    ])
