"""The addon's options, read once: parsing and checking each value, with a message that
names the option when it is wrong."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import exceptions

DEFAULT_KIMI_HOSTS = ("api.kimi.com",)
DEFAULT_MAX_WAIT_S = 30.0
CLIENT_TOKEN_ENV = "KIMI_ROTATOR_CLIENT_TOKEN"


def normalize_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def parse_hosts(hosts: Sequence[str]) -> frozenset[str]:
    parsed = frozenset(normalize_host(h) for h in hosts if h.strip())
    for host in parsed:
        if "/" in host or ":" in host and not host.startswith("["):
            raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
    if not parsed:
        raise ValueError("at least one host is needed")
    return parsed


def parse_seconds(option: str, text: str, least: float, most: float) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise exceptions.OptionsError(f"{option}: {text!r} is not a number of seconds") from None
    if not least <= seconds <= most:  # also refuses nan
        raise exceptions.OptionsError(f"{option} must be between {least:g} and {most:g} seconds")
    return seconds


def read_client_token(path: str) -> str | None:
    """The client token from its file, else from the environment; None if neither is set."""
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise exceptions.OptionsError(f"kimi_client_token_file: cannot read {path}: {e.strerror}") from e
        if not token:
            raise exceptions.OptionsError(f"kimi_client_token_file: {path} is empty")
        return token
    return os.environ.get(CLIENT_TOKEN_ENV, "").strip() or None
