"""Naming a Redis store without the Redis client: its URL schemes, the default key prefix,
the names of what it holds (key ids, slots, the notices channel),
the URL as messages show it (password masked), and whether keys would travel safely.

Kept apart from `rotator.store.redis_store` so options and messages work where the
optional `redis` client (the `team` extra) is not installed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PREFIX = "kimi-rotator:"
SCHEMES = ("redis", "rediss")


def masked_url(url: str) -> str:
    """`url` with its password replaced by *** (the user name kept); one that does not
    parse as a URL is all *** after its scheme, as a password may be anywhere in it."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        port = parts.port
    except ValueError:
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://***" if sep else "***"
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def is_private_url(url: str) -> bool:
    """Whether the keys stay safe on the way: TLS, or a server on this machine."""
    parts = urlsplit(url)
    if parts.scheme == "rediss":
        return True
    host = (parts.hostname or "localhost").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def key_id(key: str) -> str:
    """How a Redis key name or a notice names an API key: a short digest, so the key
    itself shows in no key name, MONITOR line or notice."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def key_with_id(keys: Iterable[str], wanted: str) -> str | None:
    """The key among `keys` that a notice's key id names, if any."""
    return next((key for key in keys if key_id(key) == wanted), None)


# What a pool's processes tell each other (`notices_channel`): "state" (the stored pool
# changed in a way others must see now), "freed <key id>" (a slot given back on a key at
# its cap), "pause <ms>" (Kimi throttles the team: every key paused this long), "limited
# <key id>" (Kimi rate limited that key at one proxy: the others count it for a throttle).
NOTICE_STATE = "state"
NOTICE_FREED = "freed"
NOTICE_PAUSE = "pause"
NOTICE_LIMITED = "limited"


def notices_channel(prefix: str) -> str:
    """The pub/sub channel a pool's processes tell each other on."""
    return f"{prefix}notices"


def slots_key(prefix: str, key: str) -> str:
    """The sorted set of a key's in-flight slots (member: holder, score: expiry ms)."""
    return f"{prefix}slots:{key_id(key)}"


def pin_key(prefix: str, conversation_id: str) -> str:
    """Where a team keeps a conversation's pin (its key's id, conversation affinity): by
    a digest of the id, so every name has one short shape."""
    return f"{prefix}pin:{hashlib.sha256(conversation_id.encode()).hexdigest()[:24]}"
