"""Who may spend the pool's keys: pure decisions about a client, no proxy needed.

By default only programs on this machine (loopback clients) get keys: mitmproxy listens
on every interface unless told otherwise, and a proxy that injects secrets must not hand
them to the café Wi-Fi. Remote clients need an explicit opt-in plus an authentication
step. A client token, when configured, is required from every client.

A web page the user opens runs on this machine too, and can send requests to the
proxy's port: by a name of its own made to resolve to 127.0.0.1 (DNS rebinding: its
requests are then same-origin, and carry that name as `Host`), or from its own site
(`Origin`, `Sec-Fetch-Site: cross-site`; a `text/plain` POST needs no CORS preflight).
`check_page` refuses both; loopback origins (a local web UI) and requests without an
Origin (CLI agents) pass, and so does a client that presented the client token, which
no page can know.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
from collections.abc import Collection, Mapping, Sequence
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
FOREIGN_HOST = Denial(
    403,
    "permission_error",
    "kimi-rotator only serves requests addressed to this machine (Host: localhost, 127.0.0.1 or [::1]): "
    "a web page whose own name was made to point here (DNS rebinding) gets nothing; to serve other "
    "machines, start it with --set kimi_allow_remote=true, or send the client token",
)
FOREIGN_PAGE = Denial(
    403,
    "permission_error",
    "kimi-rotator does not serve web pages of other sites (Origin, Sec-Fetch-Site): a page you open "
    "must not spend your Kimi keys; a web UI on http://localhost or 127.0.0.1 is served, any other "
    "needs the client token (kimi_client_token_file)",
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


# An Origin as browsers serialise it: scheme://host[:port], nothing else.
_ORIGIN = re.compile(r"(https?)://(\[[0-9a-fA-F:.]+\]|[^\s/:@?#\[\],]+)(?::\d{1,5})?")


@functools.lru_cache(maxsize=1024)  # asked for every request in reverse mode; names are few
def host_part(authority: str) -> str:
    """The host in a `Host` header or an authority (`host`, `host:port`, `[v6]:port`)."""
    text = authority.strip()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") > 1:  # an IPv6 address without brackets: no port to take off
        return text
    return text.partition(":")[0]


@functools.lru_cache(maxsize=1024)  # asked for every request in reverse mode; names are few
def names_this_machine(host: str) -> bool:
    """localhost (and names under it), a loopback address, or the unspecified one: a name
    no page elsewhere can be served from, as browsers resolve `*.localhost` themselves."""
    name = host.rstrip(".").lower()
    if is_loopback_host(name) or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False


def is_local_origin(origin: str) -> bool:
    """True for the Origin of a page served from this machine (http://localhost:3000)."""
    found = _ORIGIN.fullmatch(origin.strip())
    return found is not None and names_this_machine(found.group(2).strip("[]"))


def check_page(
    *,
    addressed: Sequence[str] | None,
    origin: str | None,
    fetch_site: str | None,
    own_hosts: Collection[str],
    allow_remote: bool,
    token_presented: bool,
) -> Denial | None:
    """None unless this request may come from a web page that must not spend the keys.

    `addressed`: in reverse mode, every name the client gave the proxy (`Host` headers,
    the authority), None in other modes, where they name the destination. `origin`,
    `fetch_site`: its `Origin` and `Sec-Fetch-Site` headers, several joined with ", "
    (set by browsers only; a page can't forge them). `own_hosts`: the Kimi hosts (a
    hosts-file setup names one). `token_presented`: it carried the right client token.

    A name not of this machine is refused unless remote clients are allowed (their own
    authentication stops a page); an Origin not of this machine (`null` included) is
    refused, and so is a cross-site request without one. The client token lifts both.
    """
    if token_presented:
        return None
    if addressed is not None and not allow_remote:
        for name in addressed:
            host = host_part(name)
            if not (names_this_machine(host) or host.rstrip(".").lower() in own_hosts):
                return FOREIGN_HOST
    if origin is not None:
        return None if is_local_origin(origin) else FOREIGN_PAGE
    if fetch_site is not None and "cross-site" in (part.strip().lower() for part in fetch_site.split(",")):
        return FOREIGN_PAGE
    return None
