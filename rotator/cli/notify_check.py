"""The notify-test verb: one test message to each configured (or given) apprise URL, and
a line per URL saying it was sent or why not."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping

from rotator.notify.channels import NOTIFY_ENV, notify_urls, parse_urls
from rotator.notify.delivery import notify_test

EXIT_FAILED = 1


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url", metavar="URL", nargs="?",
        help=f"an apprise URL (several: separate with commas); default ${NOTIFY_ENV}",
    )


def run(url: str | None, out: Callable[[str], None], err: Callable[[str], None],
        environ: Mapping[str, str] = os.environ) -> int:
    """0 when every URL took the message; else 1, with one line per URL that failed."""
    urls = parse_urls([url]) if url else notify_urls((), environ)
    ok, lines = notify_test(urls)
    for line in lines:
        (out if line.startswith("sent to ") else err)(line)
    return 0 if ok else EXIT_FAILED
