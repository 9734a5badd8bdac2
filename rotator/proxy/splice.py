"""Answering a client with a response the addon feeds as it comes (a retry's stream), in
place of the refusal its own request got: the one module that reaches into mitmproxy's
private HTTP layer.

Why private parts: mitmproxy streams a response only from the flow's own server
connection, decided at `responseheaders` (mitmproxy issue 8103 asks for more); a retry's
answer comes on another connection. So, for a client request whose answer is an error
that may be retried, `take_over` (called in `responseheaders`) tells the flow's HTTP
stream to hold the refusal instead of sending it: its body is kept for the policy to
read, and the stream then waits for what the addon sends it. The addon answers with
`whole` (the refusal or a retry's answer, at once, as mitmproxy would have) or with
`start`, `data`…, `end` (a retry's answer, event by event).

What is used, all on mitmproxy 11.0 and 12.x alike (tests/test_splice.py checks each
name on the installed mitmproxy, tests/test_e2e_streamed_retry.py the behaviour):
- `Proxyserver.connections` / `ConnectionHandler.layer`, walked down (`layer`,
  `child_layer`, `streams`) to the `HttpStream` whose `flow` is the client's;
- that stream's `start_response_stream` (replaced on the instance, so the held refusal
  never reaches the client), `server_state`, `send_response`, `stream_id`, `context`;
- `Proxyserver.inject_event` with a `MessageInjected` that is also an `HttpEvent`: the
  HTTP layer delivers injected messages straight to the stream that owns the client's
  current request (as for WebSocket injection), which then runs it as a response event.
  That routing is by the client's HTTP/1 connection: HTTP/2 clients are not taken over.
If any of it is missing (another mitmproxy), `take_over` returns None once and says so
in the log, and retried answers arrive whole, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import commands, events

from rotator.proxy.flows import client_closed

logger = logging.getLogger(__name__)

try:  # the private parts, in one place
    from mitmproxy.proxy.layers.http import HttpStream, SendHttp
    from mitmproxy.proxy.layers.http._base import HttpEvent
    from mitmproxy.proxy.layers.http._events import (
        ResponseData,
        ResponseEndOfMessage,
        ResponseHeaders,
        ResponseProtocolError,
        ResponseTrailers,
    )

    try:  # mitmproxy 12 names the error's kind; 11 takes the status a client would see
        from mitmproxy.proxy.layers.http._events import ErrorCode  # type: ignore[attr-defined]

        _SERVER_BROKE_OFF: Any = ErrorCode.GENERIC_SERVER_ERROR
    except ImportError:
        _SERVER_BROKE_OFF = 502
    _IMPORTED = True
except ImportError:  # pragma: no cover (another mitmproxy)
    _IMPORTED = False

Commands = Iterator[commands.Command]


@dataclass
class _Route:
    """Where an injected step goes: the client's connection (mitmproxy's HTTP layer finds
    the stream by it); no server connection, so it never looks there."""

    client_conn: connection.Client
    server_conn: None = None


class Splice:
    """A held client response: `refusal` completes (True) when the refused answer has
    been read whole into the client flow's response, or (False) if the stream ended
    otherwise; then exactly one of `whole` or `start` … `end` answers the client."""

    def __init__(self, flow: http.HTTPFlow, stream: Any, server: Any) -> None:
        self.flow = flow
        self._stream = stream
        self._server = server
        self._route = _Route(flow.client_conn)
        self.refusal: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.started = False  # headers of an answer went to the client
        self.closed = False  # the client's connection went away before the answer ended
        self._pending: list[bytes] = []  # body chunks whose step is on its way

    def whole(self, response: http.Response) -> bool:
        """Answer at once with `response` (the client flow's `response` hook runs)."""
        return self._send(_Whole(response))

    def start(self, response: http.Response) -> bool:
        """Send `response`'s status and headers; its body follows by `data`."""
        self.started = True
        return self._send(_Start(response))

    def data(self, chunk: bytes) -> bool:
        """Send `chunk` of the body. Chunks that come while one is on its way go with it:
        one pass through mitmproxy's layers for a burst, not one a chunk."""
        if not chunk:
            return True
        if self._pending:
            self._pending.append(chunk)
            return not self.closed
        self._pending.append(chunk)
        return self._send(_Data(self._pending))

    def end(self) -> bool:
        """End the body (the client flow's `response` hook runs)."""
        return self._send(_End(None))

    def abort(self, reason: str) -> bool:
        """End a started answer as mitmproxy ends one whose server broke off: the client's
        connection is closed (no clean end it could take for the whole answer), and the
        client flow gets its `error` hook."""
        return self._send(_Abort(reason))

    def release(self) -> None:
        """The held stream ended without its refusal being read (no body, or an error):
        whoever awaits `refusal` gets False."""
        if not self.refusal.done():
            self.refusal.set_result(False)

    def _send(self, step: _Step) -> bool:
        # A client gone (its stream ended with an error) takes nothing more: injected
        # into a dropped stream, a step would crash the connection's handler.
        if self.closed or self.flow.error is not None or client_closed(self.flow):
            self.closed = True
            return False
        step.bind(self)
        try:
            self._server.inject_event(step)
        except ValueError:  # "Flow is not from a live connection."
            self.closed = True
            return False
        return True

    # -- inside mitmproxy's HTTP layer (called by the held stream) --------------------
    def _hold(self) -> Commands:
        """What replaces `start_response_stream`: no headers to the client; the stream
        now reads its server's answer into the flow and then obeys injected steps."""
        body = bytearray()
        stream = self._stream

        def held(event: events.Event) -> Commands:
            if isinstance(event, _Step):
                yield from event.apply(stream)
            elif isinstance(event, ResponseData):
                body.extend(event.data)
            elif isinstance(event, ResponseTrailers):
                pass  # a refusal's trailers say nothing the policy reads
            elif isinstance(event, ResponseEndOfMessage):
                assert stream.flow.response is not None
                stream.flow.response.stream = False
                stream.flow.response.data.content = bytes(body)
                if not self.refusal.done():
                    self.refusal.set_result(True)

        stream.server_state = held
        yield from ()


class _Step(events.MessageInjected, HttpEvent):  # type: ignore[misc]
    """One instruction for the held stream, delivered through mitmproxy's injection."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload
        self.message = payload

    def bind(self, splice: Splice) -> None:
        self.flow = splice._route  # type: ignore[assignment]
        self.stream_id = splice._stream.stream_id

    def apply(self, stream: Any) -> Commands:
        raise NotImplementedError  # pragma: no cover

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Whole(_Step):
    def apply(self, stream: Any) -> Commands:
        stream.flow.response = self.payload
        yield from stream.send_response()


class _Start(_Step):
    def apply(self, stream: Any) -> Commands:
        stream.flow.response = self.payload
        yield SendHttp(ResponseHeaders(stream.stream_id, self.payload, end_stream=False), stream.context.client)


class _Data(_Step):
    def apply(self, stream: Any) -> Commands:
        chunks: list[bytes] = self.payload  # the splice's pending list: emptied as it goes
        data = b"".join(chunks)
        chunks.clear()
        yield SendHttp(ResponseData(stream.stream_id, data), stream.context.client)


class _End(_Step):
    def apply(self, stream: Any) -> Commands:
        yield from stream.send_response(already_streamed=True)


class _Abort(_Step):
    def apply(self, stream: Any) -> Commands:
        yield from stream.handle_protocol_error(ResponseProtocolError(stream.stream_id, self.payload, _SERVER_BROKE_OFF))


def _children(layer: Any) -> Iterator[Any]:
    for name in ("layer", "child_layer"):
        child = getattr(layer, name, None)
        if child is not None:
            yield child
    streams = getattr(layer, "streams", None)
    if isinstance(streams, dict):
        yield from streams.values()
    # A mode layer (HttpProxy, HttpUpstreamProxy) keeps its child only as the bound
    # method it handed its events to.
    delegate = getattr(getattr(layer, "_handle_event", None), "__self__", None)
    if delegate is not None and delegate is not layer:
        yield delegate


def find_stream(root: Any, flow: http.HTTPFlow) -> Any | None:
    """The HTTP stream (in the layer tree under `root`) that carries `flow`."""
    todo, seen = [root], set()
    while todo:
        layer = todo.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, HttpStream) and getattr(layer, "flow", None) is flow:
            return layer
        todo.extend(_children(layer))
    return None


_said_unavailable = False


def _unavailable(why: str) -> None:
    global _said_unavailable
    if not _said_unavailable:
        _said_unavailable = True
        logger.warning("kimi-rotator: retried answers arrive whole, not streamed: %s", why)


def take_over(flow: http.HTTPFlow) -> Splice | None:
    """In `responseheaders`: hold this client flow's answer (see the module's docstring).
    None when it can't be (an HTTP/2 or HTTP/3 client, or parts missing): the answer
    then goes its usual way."""
    if not _IMPORTED:
        _unavailable("this mitmproxy lacks the parts a streamed retry needs")
        return None
    if not flow.request.http_version.startswith("HTTP/1"):
        return None
    server = ctx.master.addons.get("proxyserver") if ctx.master else None
    handler = getattr(server, "connections", {}).get(flow.client_conn.id) if server else None
    if handler is None:
        return None
    stream = find_stream(getattr(handler, "layer", None), flow)
    if stream is None or not hasattr(stream, "start_response_stream"):
        _unavailable("the client's HTTP stream could not be found")
        return None
    splice = Splice(flow, stream, server)
    stream.start_response_stream = splice._hold  # instance attribute: this stream only
    assert flow.response is not None
    flow.response.stream = True  # so mitmproxy calls it (our _hold) rather than buffering
    return splice
