"""Sending requests of the proxy's own through mitmproxy: the one user of `ReplayHandler`.

A retry resends a copy of a client's request; a quota probe sends a fresh request that
no client made. Both go through mitmproxy's own connection handling, so the upstream
proxy mode, TLS trust and every other addon apply to them as to any flow, and both can
be stopped half-way (cancelled). `ReplayHandler` is not public API, which is why it is
confined to this module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from mitmproxy import connection, ctx, http
from mitmproxy.addons.clientplayback import ReplayHandler
from mitmproxy.proxy.mode_specs import ProxyMode


def copy_to_resend(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A fresh copy of `flow`'s request, with no answer yet."""
    copy = flow.copy()
    # Marked as a replay, as mitmproxy's own client replay does, so proxyauth and
    # other addons treat it as the already-admitted request it is.
    copy.is_replay = "request"
    copy.response = None
    copy.error = None
    copy.comment = ""
    copy.metadata.clear()
    return copy


def client_identity(request: http.Request) -> list[tuple[bytes, bytes]]:
    """The headers by which Kimi knows the client (User-Agent, X-Msh-*): requests of our
    own made on a client's behalf carry them unchanged, never forged."""
    return [
        (name, value) for name, value in request.headers.fields
        if name.lower() == b"user-agent" or name.lower().startswith(b"x-msh-")
    ]


def fresh_request(
    method: str, scheme: str, host: str, port: int, path: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> http.HTTPFlow:
    """A request of the proxy's own, from no client, to `scheme://host:port/path`.

    It comes in through the proxy's first mode, as a client's request would: mitmproxy's
    HTTP layer reads the mode from the client connection (upstream mode needs it to go
    through the upstream proxy at all)."""
    now = time.time()
    client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=now)
    modes = ctx.options.mode if ctx.options and "mode" in ctx.options else []
    if modes:
        client.proxy_mode = ProxyMode.parse(modes[0])
    flow = http.HTTPFlow(client, connection.Server(address=(host, port)))
    authority = host if (scheme, port) in (("https", 443), ("http", 80)) else f"{host}:{port}"
    flow.request = http.Request(
        host, port, method.encode(), scheme.encode(), b"", path.encode(), b"HTTP/1.1",
        http.Headers([(b"host", authority.encode()), *headers]), b"", None, now, now,
    )
    flow.is_replay = "request"
    return flow


Send = Callable[[http.HTTPFlow], Awaitable[None]]


async def send(flow: http.HTTPFlow) -> None:
    """Send `flow` through mitmproxy; its hooks run as for any flow. Returns once it has
    an answer or an error.

    Cancelled, it stops the flow where it is: killed, so it goes no further if one of its
    hooks is pending (`flow.kill()` alone can't stop a flow in transit, mitmproxy issue
    4711), and its server connection closed, so Kimi sees the request end and stops
    answering it. The flow then gets its `error` hook, as any flow cut short; the
    connection is closed the way mitmproxy's replay closes it after an answer."""
    handler = ReplayHandler(flow, ctx.options)
    try:
        await handler.replay()
    except asyncio.CancelledError:
        if flow.killable:
            flow.kill()
        for connection_io in handler.transports.values():
            if connection_io.handler is not None:
                connection_io.handler.cancel("kimi-rotator: stopped")
        raise
