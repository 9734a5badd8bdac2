"""Putting a pool key in a request's headers, and masking it once the request has gone."""

from __future__ import annotations

import functools
from typing import NamedTuple

from mitmproxy import http

from rotator.core.keys import mask_key_ascii


class KeyPlacement(NamedTuple):
    """Where a pool key went in a request's headers, so masking it is one write."""

    name: bytes  # lower-case header name
    prefix: bytes  # b"Bearer " or b""
    index: int  # position in headers.fields when it was put there


# KeyPlacement(...) without the Python-level __new__ a NamedTuple gets (made once a request).
_placement = functools.partial(tuple.__new__, KeyPlacement)


def replace_client_key(
    headers: http.Headers, key: str, *, bearer: bool = False, unreadable: frozenset[str] = frozenset()
) -> KeyPlacement:
    """Put `key` where the client put its own, and nowhere else; with `unreadable`, also
    take those content codings out of Accept-Encoding, so the answer comes in one the
    proxy can read (the client decodes either just the same).

    Bearer clients get a Bearer header; everyone else gets x-api-key (a client sending
    both gets x-api-key only); `bearer` forces the Bearer form. Another kind of
    Authorization (say Basic, for proxy auth in reverse mode) is left alone. Works on the
    raw fields in one pass: this runs for every request, and each Headers lookup is a
    scan of its own.
    """
    fields = list(headers.fields)
    api_key_at: list[int] = []
    bearer_at: list[int] = []
    for i, (name, value) in enumerate(fields):
        size = len(name)  # lowering every name of every request costs more than the rest
        if size == 9 and name.lower() == b"x-api-key":
            api_key_at.append(i)
        elif size == 13 and name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            bearer_at.append(i)
        elif size == 15 and unreadable and name.lower() == b"accept-encoding":
            readable = _readable_codings(value, unreadable)
            if readable is not None:
                fields[i] = (name, readable)
    secret = key.encode()
    # The usual request carries one x-api-key and nothing to drop: one write, no sorting.
    if bearer or (bearer_at and not api_key_at):
        drop = api_key_at + bearer_at[1:] if bearer else bearer_at[1:]
        name, prefix, secret = b"authorization", b"Bearer ", b"Bearer " + secret
        at = bearer_at[0] if bearer_at else -1
    else:
        drop = api_key_at[1:] + bearer_at if api_key_at else bearer_at
        name, prefix = b"x-api-key", b""
        at = api_key_at[0] if api_key_at else -1
    if at < 0:
        at = len(fields)
        fields.append((name, secret))
    else:
        fields[at] = (fields[at][0], secret)
    if drop:
        for i in sorted(drop, reverse=True):
            del fields[i]
        at -= sum(1 for i in drop if i < at)
    headers.fields = tuple(fields)
    return _placement((name, prefix, at))


def mask_sent_key(headers: http.Headers, key: str, placement: KeyPlacement | None = None) -> None:
    """Replace the pool key in a request that has gone upstream with its masked form."""
    fields = headers.fields
    secret, masked = _secret_and_masked(key)
    if placement is not None:
        wanted, prefix, at = placement
        if at < len(fields):
            name, value = fields[at]
            if value == prefix + secret and name.lower() == wanted:
                headers.fields = (*fields[:at], (name, prefix + masked), *fields[at + 1 :])
                return
    # Another addon moved things: look everywhere.
    headers.fields = tuple((name, value.replace(secret, masked)) for name, value in fields)


def is_event_stream(headers: http.Headers) -> bool:
    """Whether a response is Server-Sent Events. Read from the raw fields: this runs for
    every successful answer, and a Headers lookup converts every name it passes."""
    for name, value in headers.fields:
        if len(name) == 12 and name.lower() == b"content-type":
            return value.lstrip().lower().startswith(b"text/event-stream")
    return False


@functools.lru_cache(maxsize=256)  # a pool has a few keys, masked once per request
def _secret_and_masked(key: str) -> tuple[bytes, bytes]:
    """The key as header bytes, and its masked form."""
    return key.encode(), mask_key_ascii(key).encode()


@functools.lru_cache(maxsize=256)  # a client sends the same value on every request
def _readable_codings(value: bytes, unreadable: frozenset[str]) -> bytes | None:
    """An Accept-Encoding value without `unreadable` codings; None if it has none."""
    offered = [c.strip() for c in value.decode("latin-1").split(",") if c.strip()]
    kept = [c for c in offered if c.split(";")[0].strip().lower() not in unreadable]
    if kept == offered:
        return None
    return ", ".join(kept or ["identity"]).encode("latin-1")
