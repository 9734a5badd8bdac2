"""Test-only mitmproxy addon: pretend every host name resolves to 127.0.0.1.

Load it AFTER the addon under test::

    mitmdump -s rotator/addon.py -s tests/support/loopback_dns.py \
        --set loopback_dns_port=PORT_OF_FAKE_SERVER

so the addon under test sees the real destination (``api.kimi.com``,
``api.kimi.com.evil.test``, ...) in all its hooks, and this shim then, in its
own ``request`` hook, re-points the flow to ``http://127.0.0.1:<port>`` (plain
HTTP: the fake servers speak no TLS). The ``Host`` header (and, for HTTP/2,
``:authority``) stays as the client sent it. Nothing is ever sent off loopback:
a flow for which no port is configured is answered with a 502 here.

Options
-------
``loopback_dns_port`` (int, default 0)
    Port on 127.0.0.1 every non-loopback destination goes to. 0 = none.
``loopback_dns_map`` (str, default "")
    Per-host ports, ``"api.kimi.com=41001,api.moonshot.ai=41002"``; wins over
    ``loopback_dns_port``.

Details
-------
* Flows already answered by an earlier addon (``flow.response`` set) and flows
  already going to 127.0.0.1 (e.g. reverse mode to a fake server) are left alone.
* The original destination is kept in
  ``flow.metadata["loopback_dns.original"] = (scheme, host, port)``.
* If an earlier addon turned on request-body streaming in ``requestheaders``,
  mitmproxy connects before the ``request`` hook, so for those flows the
  redirect already happens in ``requestheaders``.
* ``CONNECT`` (HTTPS through a regular-mode proxy): mitmproxy's default
  ``connection_strategy=eager`` would connect (and resolve the name!) right
  after ``http_connect``, then try TLS with the plain-HTTP fake. The shim
  therefore forces ``connection_strategy=lazy`` (logged), and answers a
  CONNECT with 502 if the strategy is somehow not lazy. The CONNECT target is
  left as is: inside the tunnel mitmproxy's HTTP layer runs in transparent
  mode and takes ``request.host``/``scheme`` from it, so the addon under test
  sees ``https://api.kimi.com/...``; the ``request`` hook then redirects to
  ``http://127.0.0.1:<port>`` (mitmproxy opens a new, plain connection).
* Plain-HTTP absolute-form requests in regular mode (``GET http://api.kimi.com/…``)
  never connect before the ``request`` hook, whatever the strategy.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions, http

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
METADATA_KEY = "loopback_dns.original"


def _parse_map(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        host, sep, port = item.rpartition("=")
        if not sep or not host.strip():
            raise exceptions.OptionsError(
                f"loopback_dns_map: expected host=port, got {item!r}")
        try:
            p = int(port)
        except ValueError:
            raise exceptions.OptionsError(f"loopback_dns_map: bad port in {item!r}") from None
        if not 0 < p < 65536:
            raise exceptions.OptionsError(f"loopback_dns_map: bad port in {item!r}")
        out[host.strip().lower().rstrip(".")] = p
    return out


class LoopbackDNS:
    def __init__(self) -> None:
        self.map: dict[str, int] = {}
        self.redirected = 0

    def load(self, loader) -> None:
        loader.add_option("loopback_dns_port", int, 0,
                          "tests: send every non-loopback destination to 127.0.0.1:PORT")
        loader.add_option("loopback_dns_map", str, "",
                          "tests: per-host loopback ports, 'host=port,host=port'")

    def configure(self, updated) -> None:
        if "loopback_dns_map" in updated:
            self.map = _parse_map(ctx.options.loopback_dns_map)
        if "loopback_dns_port" in updated:
            p = ctx.options.loopback_dns_port
            if not 0 <= p < 65536:
                raise exceptions.OptionsError(f"loopback_dns_port: bad port {p}")
        if ctx.options.connection_strategy != "lazy":
            logger.warning("loopback_dns: forcing connection_strategy=lazy so that no "
                           "upstream connection (or DNS lookup) happens before the "
                           "request hook")
            ctx.options.update(connection_strategy="lazy")

    def _port_for(self, host: str) -> int:
        return self.map.get(host.lower().rstrip("."), ctx.options.loopback_dns_port)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # Leave the CONNECT target alone: inside the tunnel mitmproxy runs its HTTP
        # layer in transparent mode, taking request.host/scheme from the CONNECT
        # target, so the request hook below still sees the real name. With
        # connection_strategy=lazy nothing is connected (or resolved) before that.
        if flow.response or flow.request.host == LOOPBACK:
            return
        if ctx.options.connection_strategy != "lazy":
            flow.response = self._refuse(
                flow.request.host, "connection_strategy is not lazy (would resolve "
                "and connect before the request hook)")
            return
        if not self._port_for(flow.request.host):
            flow.response = self._refuse(flow.request.host)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.stream:
            self._redirect(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self._redirect(flow)

    def _refuse(self, host: str, why: str = "no loopback port configured") -> http.Response:
        msg = f"loopback_dns: refusing to leave loopback for {host}: {why}"
        logger.error(msg)
        return http.Response.make(502, (msg + "\n").encode(),
                                  {"content-type": "text/plain"})

    def _redirect(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if flow.response or req.host == LOOPBACK:
            return
        port = self._port_for(req.host)
        if not port:
            flow.response = self._refuse(req.host)
            return
        flow.metadata.setdefault(METADATA_KEY, (req.scheme, req.host, req.port))
        # Setting host/port rewrites the Host header and authority: keep the client's.
        host_header = req.headers.get("host")
        authority = req.authority
        req.scheme = "http"
        req.host = LOOPBACK
        req.port = port
        if host_header is not None:
            req.headers["host"] = host_header
        if authority:
            req.authority = authority
        self.redirected += 1
        logger.debug("loopback_dns: %s -> %s:%d", flow.metadata[METADATA_KEY], LOOPBACK, port)


addons = [LoopbackDNS()]
