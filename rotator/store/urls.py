"""Naming a Redis store without the Redis client: its URL schemes, the default key prefix,
the URL as messages show it (password masked), and whether keys would travel safely.

Kept apart from `rotator.store.redis_store` so options and messages work where the
optional `redis` client (the `team` extra) is not installed.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

DEFAULT_PREFIX = "kimi-rotator:"
SCHEMES = ("redis", "rediss")


def masked_url(url: str) -> str:
    """`url` with its password replaced by *** (the user name kept)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def is_private_url(url: str) -> bool:
    """Whether the keys stay safe on the way: TLS, or a server on this machine."""
    parts = urlsplit(url)
    if parts.scheme == "rediss":
        return True
    host = (parts.hostname or "localhost").lower()
    return host in ("localhost", "::1") or host.startswith("127.")
