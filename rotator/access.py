"""Who may spend the pool's keys: pure decisions about a client, no proxy needed.

By default only programs on this machine (loopback clients) get keys: mitmproxy listens
on every interface unless told otherwise, and a proxy that injects secrets must not hand
them to the café Wi-Fi. Remote clients need an explicit opt-in plus an authentication
step. A client token, when configured, is required from every client.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Denial:
    status: int
    error_type: str
    message: str


REMOTE_FORBIDDEN = Denial(
    403,
    "permission_error",
    "kimi-rotator only serves clients on this machine; start it with "
    "--set kimi_allow_remote=true (and proxyauth or a client token) to serve others",
)
TOKEN_REQUIRED = Denial(
    401,
    "authentication_error",
    "kimi-rotator needs its client token: send it as x-api-key (or Authorization: Bearer)",
)


def is_loopback_address(address: Any) -> bool:
    """True for a (host, port, ...) peer address on 127.0.0.0/8 or ::1 (IPv4-mapped too)."""
    try:
        return _is_loopback_ip(str(address[0]))
    except (TypeError, IndexError):
        return False


@functools.lru_cache(maxsize=1024)  # asked for every request; clients are few
def _is_loopback_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@functools.lru_cache(maxsize=1024)  # asked for every plain-HTTP request; hosts are few
def is_loopback_host(host: str) -> bool:
    """True for a destination on this machine: localhost or a loopback address."""
    return host.rstrip(".").lower() == "localhost" or is_loopback_address((host.strip("[]"),))


def presented_credential(headers: Mapping[str, str]) -> str | None:
    """The key or token the client put in its request, if any."""
    api_key = headers.get("x-api-key")
    if api_key:
        return api_key.strip()
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def check_client(
    *,
    from_loopback: bool,
    allow_remote: bool,
    client_token: str | None,
    presented: str | None,
) -> Denial | None:
    """None if this client may use the pool, else why not."""
    if not from_loopback and not allow_remote:
        return REMOTE_FORBIDDEN
    if client_token is not None:
        if presented is None or not hmac.compare_digest(presented.encode(), client_token.encode()):
            return TOKEN_REQUIRED
    return None
