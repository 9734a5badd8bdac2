"""What a request says about who sent it, for rotator.core.access.check_page: its Origin and
Sec-Fetch-Site, and in reverse mode the name the client gave the proxy (`Host`; HTTP/2:
`:authority`); and the warning, once per kind, that such a request was refused.

mitmproxy overwrites a reverse-mode client's Host with the target's before any addon hook
runs. It is kept by turning mitmproxy's `keep_host_header` on, read here, and the
target's put back before the request goes upstream, its TLS name (SNI) too: Kimi gets
what it got before, whoever turned the option on (a script reloaded by mitmproxy finds it
on, and a client's local name is of no use to Kimi).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

from mitmproxy import http
from mitmproxy.net.http import url
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from rotator.core.access import FOREIGN_HOST, Denial
from rotator.core.text import clean_line

logger = logging.getLogger(__name__)

OPTION = "keep_host_header"
# Reverse targets mitmproxy names in TLS (its ReverseProxy layer, unless keep_host_header).
_NAMED_IN_TLS = frozenset({"https", "tls", "http3", "quic", "dtls"})
SHOWN_MOST = 120  # characters of a refused request's Host or Origin in the log


class Seen(NamedTuple):
    """What a request says about who sent it, for rotator.core.access.check_page."""

    addressed: tuple[str, ...] | None  # reverse mode: the names the client gave the proxy; else None
    origin: str | None  # Origin (several: joined with ", ")
    fetch_site: str | None  # Sec-Fetch-Site (likewise)


# A request that says nothing of who sent it (no reverse-mode name, Origin or
# Sec-Fetch-Site): check_page passes it, whatever else holds.
NOTHING_SEEN = Seen(None, None, None)


class ClientHost:
    def __init__(self) -> None:
        self._told: set[str] = set()

    @staticmethod
    def configure(options: Any, updated: set[str]) -> None:
        """Keep the client's Host from mitmproxy's rewrite while any mode is reverse."""
        if not {"mode", OPTION} & updated or OPTION not in options or "mode" not in options:
            return
        if not options.keep_host_header and any(_is_reverse(spec) for spec in options.mode):
            options.keep_host_header = True  # mitmproxy configures again, with nothing left to do

    def take(self, flow: http.HTTPFlow) -> Seen:
        """What the request says about who sent it, and in reverse mode the target's Host
        put back in place of the client's. One pass over the raw header fields: this runs
        for every request, and each Headers lookup is a scan of its own (bench/README.md)."""
        request = flow.request
        reverse = _is_reverse_kind(type(flow.client_conn.proxy_mode))
        fields = request.headers.fields
        hosts: list[int] = []
        origins: list[bytes] = []
        sites: list[bytes] = []
        for i, (name, value) in enumerate(fields):
            size = len(name)  # lowering every name costs more than the rest
            if size == 4 and reverse and name.lower() == b"host":
                hosts.append(i)
            elif size == 6 and name.lower() == b"origin":
                origins.append(value)
            elif size == 14 and name.lower() == b"sec-fetch-site":
                sites.append(value)
        if not reverse and not origins and not sites:
            return NOTHING_SEEN  # a CLI agent's request, the usual one
        addressed = None
        if reverse:
            addressed = (_text(fields[hosts[0]][1]),) if len(hosts) == 1 else tuple(_text(fields[i][1]) for i in hosts)
            if request.data.authority:  # HTTP/2's :authority, or an absolute-form request line
                addressed = (request.authority, *addressed)
            _put_back_target(flow, hosts)
        return Seen(addressed, _joined(origins), _joined(sites))

    @staticmethod
    def server_connect(data: ServerConnectionHookData) -> None:
        """Name the reverse target in TLS, as mitmproxy does without keep_host_header
        (else the client's own TLS name would go upstream)."""
        mode = data.client.proxy_mode
        if isinstance(mode, ReverseMode) and mode.scheme in _NAMED_IN_TLS and data.server.address == mode.address:
            data.server.sni = mode.address[0]

    def tell_once(self, denial: Denial, seen: Seen) -> None:
        """Warn once per kind of refusal (a page could flood the log; /metrics counts them all)."""
        if denial.message in self._told:
            return
        self._told.add(denial.message)
        if denial is FOREIGN_HOST:
            shown = "Host " + ", ".join(seen.addressed or ())
        elif seen.origin is not None:
            shown = f"Origin {seen.origin}"
        else:
            shown = f"Sec-Fetch-Site {seen.fetch_site}, no Origin"
        logger.warning(
            "kimi-rotator: refused a request a web page may have sent (%s): %s. Said once; later ones "
            "are refused as quietly",
            clean_line(shown, SHOWN_MOST), denial.message,
        )


def _put_back_target(flow: http.HTTPFlow, hosts: list[int]) -> None:
    """The target's Host where the client's was (`hosts`: its places in the fields), as
    mitmproxy's HTTP layer writes it without keep_host_header (`request.host_header = …`)."""
    server, request = flow.server_conn, flow.request
    if server.address is None:
        return
    target, value = _target_of(server.tls, server.address[0], server.address[1])
    if request.is_http2 or request.is_http3:
        request.authority = target
        if not hosts:  # :authority is HTTP/2's Host; a Host header is only overwritten
            return
    fields = request.headers.fields
    if len(hosts) == 1 and fields[hosts[0]][1] == value:
        return  # the client named the target itself (a local reverse proxy's usual case)
    fields = list(fields)
    if not hosts:
        fields.append((b"Host", value))
    else:
        fields[hosts[0]] = (fields[hosts[0]][0], value)
        for i in reversed(hosts[1:]):
            del fields[i]
    request.headers.fields = tuple(fields)


@functools.lru_cache(maxsize=64)  # a proxy has a target or a few; asked on every request
def _target_of(tls: bool, host: str, port: int) -> tuple[str, bytes]:
    """The target's Host as mitmproxy writes it, and as header bytes."""
    target = url.hostport("https" if tls else "http", host, port)
    return target, target.encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=16)  # a handful of mode classes; an ABC's isinstance costs more
def _is_reverse_kind(mode_type: type) -> bool:
    return issubclass(mode_type, ReverseMode)


def _joined(values: list[bytes]) -> str | None:
    return _text(b", ".join(values)) if values else None


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")  # as mitmproxy's Headers read it


def _is_reverse(spec: str) -> bool:
    try:
        return isinstance(ProxyMode.parse(spec), ReverseMode)
    except ValueError:  # mitmproxy's proxyserver says what is wrong with it
        return False
