"""rotator.proxy.splice and the relay of a retry's stream (rotator.proxy.attempts), in
process: what the adapter needs of the installed mitmproxy, how a held client is
answered once its retries end, and that a relayed stream is read for tokens.

The behaviour through a real mitmdump is in tests/test_e2e_streamed_retry.py.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.layers.http import HttpLayer, HttpStream
from mitmproxy.test import taddons, tflow

from rotator.core import policy
from rotator.pool.waitline import ABANDONED
from rotator.proxy import attempts, splice, token_reading
from rotator.tokens import Usage
from testbed.hooks import NOW


# -- what the adapter uses of mitmproxy: a release that changes it fails here, by name --


def test_the_private_parts_it_uses_are_there():
    assert splice._IMPORTED
    for name in ("start_response_stream", "send_response", "handle_protocol_error"):
        assert callable(getattr(HttpStream, name, None)), f"HttpStream.{name} is gone"
    source = inspect.getsource(HttpStream.state_wait_for_response_headers)
    # The hook is followed by this check, which is where the held stream takes over.
    assert "self.flow.response.stream" in source and "self.start_response_stream()" in source
    assert "self.server_state" in inspect.getsource(HttpStream._handle_event)
    # Injected messages are routed by the client's connection to its current stream.
    routing = inspect.getsource(HttpLayer._handle_event)
    assert "MessageInjected" in routing and "event.flow.client_conn" in routing
    assert callable(getattr(Proxyserver, "inject_event", None))
    assert "connections" in inspect.getsource(Proxyserver.__init__)


def test_a_step_is_both_an_injected_message_and_an_http_event():
    from mitmproxy.proxy import events
    from mitmproxy.proxy.layers.http._base import HttpEvent

    step = splice._Data(b"x")
    assert isinstance(step, events.MessageInjected) and isinstance(step, HttpEvent)


def test_the_stream_is_found_below_a_mode_layer_that_keeps_its_child_as_a_bound_method():
    flow = tflow.tflow()

    class Mode:  # like modes.HttpProxy: its child only as the method events go to
        def __init__(self, child: Any) -> None:
            self._handle_event = child.handle_event

    class Next:
        def __init__(self, layer: Any) -> None:
            self.layer = layer

        def handle_event(self) -> None: ...

    stream = HttpStream.__new__(HttpStream)
    stream.flow = flow
    other = HttpStream.__new__(HttpStream)
    other.flow = tflow.tflow()

    class Layer:
        def __init__(self) -> None:
            self.streams = {1: other, 3: stream}

    root = Next(Mode(Next(Layer())))
    assert splice.find_stream(root, flow) is stream
    assert splice.find_stream(root, tflow.tflow()) is None


def test_no_take_over_outside_a_proxy_or_for_http2(caplog):
    flow = tflow.tflow(resp=tflow.tresp(status_code=429))
    with taddons.context():  # no proxyserver: nothing to hold
        assert splice.take_over(flow) is None
    flow.request.http_version = "HTTP/2.0"
    assert splice.take_over(flow) is None
    assert not flow.response.stream  # the answer goes its usual way


# -- how a held client is answered once its retries end ---------------------------------


class FakeSplice:
    def __init__(self, started: bool = False, closed: bool = False) -> None:
        self.started, self.closed = started, closed
        self.sent: list[tuple[str, Any]] = []

    def whole(self, response: Any) -> bool:
        self.sent.append(("whole", response.status_code))
        return True

    def end(self) -> bool:
        self.sent.append(("end", None))
        return True

    def abort(self, reason: str) -> bool:
        self.sent.append(("abort", reason))
        return True

    def data(self, chunk: bytes) -> bool:
        self.sent.append(("data", chunk))
        return True


SUCCESS = policy.classify(200, {}, None, NOW)
BROKEN = policy.classify_connection_error("peer closed connection", NOW)
LIMITED = policy.classify(429, {}, b'{"error": {"message": "too many requests"}}', NOW)


@pytest.mark.parametrize("started, why, last, expected", [
    (True, None, SUCCESS, [("end", None)]),
    (True, None, BROKEN, [("abort", "the retried answer broke off: connection to Kimi failed: peer closed connection")]),
    (False, None, LIMITED, [("whole", 429)]),  # every key refused: the last refusal, whole
    (False, None, SUCCESS, [("whole", 429)]),  # a success that did not stream (JSON): whole
    (False, ABANDONED, None, []),  # the client left: nobody to answer
])
def test_a_held_client_gets_one_answer(started, why, last, expected):
    held = FakeSplice(started)
    flow = tflow.tflow(resp=tflow.tresp(status_code=429))
    attempts._finish(held, flow, why, last)
    assert held.sent == expected


def test_a_client_gone_gets_nothing():
    held = FakeSplice(started=True, closed=True)
    attempts._finish(held, tflow.tflow(resp=True), None, SUCCESS)
    assert held.sent == []


# -- the relay ----------------------------------------------------------------------------


def test_a_relayed_stream_is_read_for_tokens_and_handed_on_chunk_by_chunk():
    flow = tflow.tflow(resp=tflow.tresp(headers=[(b"content-type", b"text/event-stream")]))
    flow.request.path = "/coding/v1/messages"
    held = FakeSplice()
    relay = attempts.Relay(token_reading.stream_reader(flow), held)  # type: ignore[arg-type]
    start = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
             b'{"input_tokens":10,"cache_read_input_tokens":90,"output_tokens":1}}}\n\n')
    delta = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}\n\n'
    chunks = [start[:30], start[30:] + delta[:5], delta[5:], b""]
    assert [relay(chunk) for chunk in chunks] == [b""] * 4  # the resend's own flow keeps nothing
    assert held.sent == [("data", chunk) for chunk in chunks]
    flow.response.stream = relay
    assert token_reading.spent(flow) == Usage(input=100, output=7, cache_read=90, cache_write=0)  # all input: 10 + 90


def test_the_unavailable_line_is_said_once(caplog, monkeypatch):
    monkeypatch.setattr(splice, "_said_unavailable", False)
    monkeypatch.setattr(splice, "_IMPORTED", False)
    caplog.set_level(logging.WARNING)
    flow = tflow.tflow(resp=tflow.tresp(status_code=429))
    assert splice.take_over(flow) is None and splice.take_over(flow) is None
    lines = [r.getMessage() for r in caplog.records if "arrive whole" in r.getMessage()]
    assert lines == ["kimi-rotator: retried answers arrive whole, not streamed: "
                     "this mitmproxy lacks the parts a streamed retry needs"]
