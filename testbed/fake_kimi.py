"""A fake Kimi "For Coding" server for tests and benchmarks (loopback only).

Plain HTTP/1.1 with keep-alive, built on ``http.server.ThreadingHTTPServer``
(one daemon thread per connection, TCP_NODELAY). It accepts any ``Host``
header, so it can stand in for ``api.kimi.com`` behind ``tests/support/loopback_dns.py``.

In-process use (pytest)::

    with FakeKimi() as kimi:                      # binds 127.0.0.1:<ephemeral>
        kimi.url                                  # "http://127.0.0.1:PORT"
        kimi.set_kimi_error("sk-kimi-a", "five_hour", times=1)
        ...                                       # send requests
        kimi.keys_seen()                          # ["sk-kimi-a", "sk-kimi-b"]
        kimi.requests[-1].headers["user-agent"]

Separate process (benchmarks)::

    python -m testbed.fake_kimi --port 0 [--event-delay 0.01] [--no-record]
    -> prints "listening on 127.0.0.1:PORT" (flushed), serves until SIGINT/SIGTERM.

Endpoints
---------
``POST /coding/v1/messages``
    Anthropic Messages. JSON body (``model``, ``max_tokens``, ``messages``,
    optional ``stream``). Success without ``stream`` -> 200 ``application/json``
    message whose text is ``"hello from fake kimi #N"`` (N = 1-based number of
    the request among all requests this server received, see
    ``SeenRequest.number``). With ``"stream": true`` -> 200
    ``text/event-stream``: ``message_start``, ``content_block_start``,
    several ``content_block_delta`` (``text_delta``), ``content_block_stop``,
    ``message_delta``, ``message_stop``; each written and flushed separately
    (``event_delay`` seconds apart, default 0). Framing: chunked
    transfer-encoding, keep-alive (``stream_framing="chunked"``, default) or no
    length + ``Connection: close`` (``stream_framing="close"``).
    A body that is not a JSON object -> 400 ``invalid_request_error``.
``POST /coding/v1/chat/completions``
    The same host's OpenAI chat endpoint (Kimi CLI's; Bearer auth). Success without
    ``stream`` -> 200 ``chat.completion`` whose one choice says ``"hello from fake
    kimi #N"``; with ``"stream": true`` -> ``chat.completion.chunk`` events as bare
    ``data:`` lines (no ``event:``), then ``data: [DONE]``. A body that is not a JSON
    object -> 400 ``invalid_request_error``. Errors here come in the OpenAI envelope
    ``{"error": {"message", "type", "code"}}``: script them with
    ``set_kimi_error(key, name, envelope="openai", path=CHAT_COMPLETIONS_PATH)``
    (a script's ``path`` defaults to /messages only).
``GET /coding/v1/models``
    ``{"object": "list", "data": [{"id": "kimi-for-coding", ...}, ...]}``.
``GET /coding/v1/usages``
    Shape of the real endpoint (numbers as strings, like Kimi sends them)::

        {"user": {"membership": {"level": "LEVEL_ADVANCED"}},
         "usage":  {"limit": "2048", "used": "3", "remaining": "2045",
                    "resetTime": "2026-01-09T15:23:13Z"},            # weekly
         "limits": [{"window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                     "detail": {"limit": "200", "used": "3", "remaining": "197",
                                "resetTime": "2026-01-06T13:33:02Z"}}],
         "parallel": {"limit": "30"}}

    ``used`` defaults to the number of ``/messages`` requests seen for the key;
    reset times default to now+5 h / now+7 d; override with ``set_usage``.
Anything else -> 404 ``not_found_error``. Any request without a key
(``x-api-key`` or ``Authorization: Bearer``) -> 401 invalid authentication.

Scripting
---------
Each key has a queue of scripted answers (``Script``). A request takes the
first queued script whose ``path`` matches (default: only
``/coding/v1/messages``; ``path=None`` matches every path); a script with
``times=N`` is used N times then removed, ``times=None`` is used forever. Keys
without a matching script get the default answer (``set_default``; normally
success). ``set_response`` replaces a key's queue, ``add_response`` appends.
A script with ``status=200`` and ``body=None`` means "normal success".
A script's ``delay`` (seconds) is slept before answering; with ``until_closed=True``
the wait ends early, answering nothing, when the client closes its connection
(``SeenRequest.closed`` then says when): a stalled Kimi whose caller gives up.
``kimi_error(name)`` / ``KIMI_ERRORS`` hold Kimi's real error answers
(see docs in ``KIMI_ERRORS``); ``set_kimi_error(key, name, ...)`` scripts one.

Usage: the Messages answers report ``input_tokens`` (about a quarter of the messages'
JSON length) and ``output_tokens`` (the words), the chat answers ``prompt_tokens`` and
``completion_tokens`` when not streamed. ``report_tokens(fresh, output, cache_read,
cache_write)`` makes every success report those figures in its shape, streamed or not
(a chat stream in its last chunk's choice, as Kimi does); ``tokens_reported()`` gives
per key what was reported, as the proxy saves it.

Streams can be held: ``gate = kimi.hold_stream_after_first_event()`` makes the
next streaming success (optionally only for one key) stop after its first
event until ``gate.set()`` (or ``gate_timeout`` seconds, default 10, so nothing
hangs; ``gate.timed_out`` then tells). ``gate.wait_reached(t)`` waits until a
stream is parked at the gate.

All bookkeeping is thread-safe. Nothing here ever connects anywhere: it only
listens (on 127.0.0.1 by default).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.server
import itertools
import json
import select
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

MESSAGES_PATH = "/coding/v1/messages"
CHAT_COMPLETIONS_PATH = "/coding/v1/chat/completions"
MODELS_PATH = "/coding/v1/models"
USAGES_PATH = "/coding/v1/usages"

# --------------------------------------------------------------------------
# Kimi's error answers (wording from public reports; see kimi-api.md)
# --------------------------------------------------------------------------

#: name -> (status, error.type, message). Messages start with the substrings
#: quoted in kimi-api.md; a rotator must match on wording, not on type
#: (e.g. "weekly", "client_identity" and "banned" share access_terminated_error).
KIMI_ERRORS: dict[str, tuple[int, str, str]] = {
    "overloaded": (
        429, "rate_limit_error",
        "The engine is currently overloaded, please try again later",
    ),
    "too_many_requests": (
        429, "rate_limit_reached_error",
        "We're receiving too many requests at the moment. Please wait and try again.",
    ),
    "five_hour": (
        403, "access_terminated_error",
        "You've reached your 5-hour usage limit. Your quota will reset when the "
        "current 5-hour window ends.",
    ),
    "weekly": (
        403, "access_terminated_error",
        "You've reached your weekly (7-day) usage limit. Your quota will reset when "
        "the current 7-day window ends.",
    ),
    "billing_cycle": (
        403, "permission_error",
        "You've reached your usage limit for this billing cycle. Your quota will be "
        "refreshed in the next cycle.",
    ),
    "monthly": (
        403, "permission_error",
        "You've reached your monthly usage limit for this billing cycle.",
    ),
    "concurrency": (
        403, "permission_error",
        "You've reached your concurrent request limit. Please wait for your other "
        "requests to finish.",
    ),
    "membership": (
        402, "permission_error",
        "We're unable to verify your membership benefits at this time. Please ensure "
        "your membership is active.",
    ),
    "client_identity": (
        403, "access_terminated_error",
        "Kimi For Coding is currently only available for Coding Agents such as "
        "Kimi CLI, Claude Code, Roo Code, Kilo Code, etc.",
    ),
    "banned": (
        403, "access_terminated_error",
        "Access terminated. Review our Community Guidelines.",
    ),
    "invalid_auth": (401, "invalid_authentication_error", "Invalid Authentication"),
    "incorrect_key": (401, "incorrect_api_key_error", "Incorrect API key provided"),
    "server_error": (500, "api_error", "Internal server error"),
    "bad_gateway": (502, "api_error", "Bad gateway"),
    "unavailable": (503, "api_error", "Service temporarily unavailable"),
    "overloaded_529": (529, "overloaded_error", "Overloaded"),
    # Wording of the OpenAI-shaped endpoints (Kimi's /chat/completions, Moonshot's
    # platform), whose types are Moonshot's.
    "engine_overloaded": (
        429, "engine_overloaded_error",
        "The engine is currently overloaded, please try again later",
    ),
    "max_concurrency": (
        429, "rate_limit_reached_error",
        "Your account org-fake<ak-fake> request reached organization max concurrency: 30, "
        "please try again after 1 seconds",
    ),
    "max_rpm": (
        429, "rate_limit_reached_error",
        "Your account org-fake<ak-fake> request reached organization max RPM: 200, "
        "please try again after 7 seconds",
    ),
    "tpm": (
        429, "rate_limit_reached_error",
        "Your account org-fake<ak-fake> request reached organization TPM rate limit, "
        "current:1000001, limit:1000000",
    ),
    "quota_exceeded": (
        429, "exceeded_current_quota_error",
        "You exceeded your current token quota: 0, please check your account balance",
    ),
    "period_limit": (
        429, "rate_limit_reached_error",
        "You've reached your usage limit for this period. Please try again later.",
    ),
    "key_expired": (
        401, "invalid_authentication_error",
        "The API Key appears to be invalid or may have expired. Please verify your API Key.",
    ),
}


def error_body(error_type: str, message: str, *, envelope: str = "anthropic") -> dict:
    """An error body.

    envelope="anthropic": ``{"type":"error","error":{"type":…,"message":…}}``;
    envelope="bare": ``{"error":{"message":…,"type":…}}`` (Kimi sends this one too);
    envelope="openai": ``{"error":{"message":…,"type":…,"code":None}}`` (/chat/completions).
    """
    if envelope == "bare":
        return {"error": {"message": message, "type": error_type}}
    if envelope == "openai":
        return {"error": {"message": message, "type": error_type, "code": None}}
    if envelope != "anthropic":
        raise ValueError(f"unknown envelope {envelope!r}")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def kimi_error(name: str, *, envelope: str = "anthropic") -> tuple[int, dict]:
    """(status, body) of one of Kimi's real error answers, by ``KIMI_ERRORS`` name."""
    status, etype, message = KIMI_ERRORS[name]
    return status, error_body(etype, message, envelope=envelope)


# --------------------------------------------------------------------------
# Data records
# --------------------------------------------------------------------------


def origin_form(target: str) -> str:
    """The path of a request target; servers must accept absolute-form (RFC 9112 3.2.2),
    which a proxy in front of us may send."""
    if "://" in target:
        rest = target.split("://", 1)[1]
        return "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    return target


@dataclass
class SeenRequest:
    """One request as the fake server received it."""

    number: int  # 1-based arrival number over all requests to this server
    method: str
    path: str  # with query string, as sent
    raw_headers: list[tuple[str, str]]  # original case and order
    headers: dict[str, str]  # lower-cased names; repeated headers joined by ", "
    key: str | None  # x-api-key, else the Bearer token of Authorization
    body: bytes
    time: float  # time.time() at arrival
    monotonic: float  # time.monotonic() at arrival
    status: int | None = None  # status answered (set once answered)
    done: float | None = None  # time.monotonic() when the answer was fully written
    closed: float | None = None  # time.monotonic() the client closed while it waited (until_closed)
    in_flight: bool = True  # counted in in_flight_by_key until just before its answer's last bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def host(self) -> str | None:
        return self.headers.get("host")

    @property
    def stream(self) -> bool:
        try:
            data = self.json
        except ValueError:
            return False
        return isinstance(data, dict) and data.get("stream") is True

    def header_names(self) -> list[str]:
        return [k for k, _ in self.raw_headers]


@dataclass
class Script:
    """A scripted answer (see module docstring)."""

    status: int = 200
    body: dict | list | bytes | str | None = None
    headers: dict[str, str] | None = None
    times: int | None = None  # remaining uses; None = forever
    delay: float = 0.0  # seconds to sleep before answering
    path: str | None = MESSAGES_PATH  # path prefix it applies to; None = all
    sse_events: list[tuple[str, Any]] | None = None  # answer as SSE with these events
    until_closed: bool = False  # the delay ends, with no answer, when the client closes

    def is_success(self) -> bool:
        return self.status == 200 and self.body is None and self.sse_events is None

    def matches(self, path: str) -> bool:
        return self.path is None or path.split("?", 1)[0].startswith(self.path)


class StreamGate:
    """Holds one SSE stream after its first event until ``set()``."""

    def __init__(self, key: str | None, timeout: float):
        self.key = key
        self.timeout = timeout
        self._release = threading.Event()
        self.reached = threading.Event()  # a stream is parked at the gate
        self.timed_out = False
        self.claimed_by: int | None = None  # SeenRequest.number

    # Event-like interface
    def set(self) -> None:
        self._release.set()

    release = set

    def is_set(self) -> bool:
        return self._release.is_set()

    def wait_reached(self, timeout: float | None = None) -> bool:
        return self.reached.wait(timeout)

    def _park(self) -> None:
        self.reached.set()
        if not self._release.wait(self.timeout):
            self.timed_out = True


CUT_STREAM = "fake-kimi:cut"  # an sse_events entry: the connection breaks there


def mid_stream_error_events(
    message: str = "The engine is currently overloaded, please try again later",
    error_type: str = "overloaded_error",
    model: str = "kimi-for-coding",
) -> list[tuple[str, Any]]:
    """SSE events of a stream that starts fine, then fails with ``event: error``."""
    return [
        ("message_start", _message_start("msg_fake_midstream_error", model, 1)),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "partial "}}),
        ("error", error_body(error_type, message)),
    ]


def _message_start(msg_id: str, model: str, input_tokens: int, usage: dict[str, int] | None = None) -> dict:
    return {
        "type": "message_start",
        "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {**(usage or {"input_tokens": input_tokens}), "output_tokens": 1},
        },
    }


def rfc3339(t: _dt.datetime | float | str) -> str:
    """RFC 3339 UTC string ("2026-01-06T13:33:02Z") from a datetime, epoch or string."""
    if isinstance(t, str):
        return t
    if isinstance(t, (int, float)):
        t = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    fake: "FakeKimi"


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    """Wait up to ``seconds`` for the client to close ``conn`` (True) without reading
    from it; bytes it sends meanwhile (not a close) are left for later, and the wait
    goes on to its end."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        readable, _, _ = select.select([conn], [], [], left)
        if not readable:
            return False
        try:
            if not conn.recv(1, socket.MSG_PEEK):
                return True
        except OSError:  # reset
            return True
        time.sleep(max(0.0, end - time.monotonic()))
    return False


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-kimi/1.0"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 60  # idle keep-alive connections end eventually
    server: _Server
    seen: SeenRequest  # the request being answered (set once it is read)

    # -- plumbing -------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.fake.verbose:
            sys.stderr.write("fake_kimi: " + (format % args) + "\n")

    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        fake = self.server.fake
        body = self._read_body()
        seen = self.seen = fake._record(self, body)
        try:
            fake._answer(self, seen)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        finally:
            seen.done = time.monotonic()
            fake._finished(seen)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch

    # -- writing helpers ------------------------------------------------
    def send_bytes(self, status: int, payload: bytes, content_type: str,
                   extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.write_last(payload if self.command != "HEAD" else b"")

    def write_last(self, data: bytes) -> None:
        """Writes an answer's last bytes. Its request stops counting as in flight just before:
        once the client has them it may send the next request on that key, and that one must
        not be counted beside this (a cap of 2 would read as 3)."""
        self.server.fake._finished(self.seen)
        self.wfile.write(data)
        self.wfile.flush()


class FakeKimi:
    """The fake server; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 event_delay: float = 0.0, gate_timeout: float = 10.0,
                 stream_framing: str = "chunked", deltas: int = 4,
                 record: bool = True, verbose: bool = False,
                 models: Iterable[str] = ("kimi-for-coding", "kimi-k2-turbo-preview")):
        if stream_framing not in ("chunked", "close"):
            raise ValueError("stream_framing must be 'chunked' or 'close'")
        self.host = host
        self._want_port = port
        self.event_delay = event_delay
        self.gate_timeout = gate_timeout
        self.stream_framing = stream_framing
        self.deltas = max(1, deltas)
        self.record = record
        self.verbose = verbose
        self.models = list(models)
        self.requests: list[SeenRequest] = []
        self._lock = threading.RLock()
        self._numbers = itertools.count(1)
        self._scripts: dict[str, list[Script]] = {}
        self._default = Script()
        self._gates: list[StreamGate] = []
        self._all_gates: list[StreamGate] = []
        self._usage: dict[str, dict[str, Any]] = {}
        self._tokens: dict[str, int] | None = None  # report_tokens(): what every success reports
        self._reported: dict[str, Counter[str]] = {}  # per key: the tokens its successes reported
        self._counts: Counter[str] = Counter()
        self._keys_order: list[str] = []
        self._in_flight: Counter[str] = Counter()
        self._max_in_flight: Counter[str] = Counter()
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.total = 0

    # -- lifecycle ------------------------------------------------------
    def start(self) -> "FakeKimi":
        if self._server is not None:
            return self
        srv = _Server((self.host, self._want_port), _Handler)
        srv.fake = self
        self._server = srv
        self._thread = threading.Thread(
            target=srv.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"fake-kimi-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is None:
            return
        with self._lock:
            gates = list(self._all_gates)
            conns = list(self._conns)
        for g in gates:
            g.set()
        srv.shutdown()
        srv.server_close()
        for c in conns:  # end keep-alive connections still held by clients
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "FakeKimi":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeKimi is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What ANTHROPIC_BASE_URL would be: ``http://127.0.0.1:PORT/coding``."""
        return self.url + "/coding"

    # -- scripting ------------------------------------------------------
    def set_response(self, key: str, status: int = 200,
                     body: dict | list | bytes | str | None = None,
                     headers: dict[str, str] | None = None, times: int | None = None,
                     *, delay: float = 0.0, path: str | None = MESSAGES_PATH,
                     sse_events: list[tuple[str, Any]] | None = None,
                     until_closed: bool = False) -> None:
        """Replace ``key``'s script queue with one answer."""
        with self._lock:
            self._scripts[key] = []
        self.add_response(key, status, body, headers, times, delay=delay, path=path,
                          sse_events=sse_events, until_closed=until_closed)

    def add_response(self, key: str, status: int = 200,
                     body: dict | list | bytes | str | None = None,
                     headers: dict[str, str] | None = None, times: int | None = None,
                     *, delay: float = 0.0, path: str | None = MESSAGES_PATH,
                     sse_events: list[tuple[str, Any]] | None = None,
                     until_closed: bool = False) -> None:
        """Append an answer to ``key``'s script queue (used after earlier ones run out)."""
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        s = Script(status, body, headers, times, delay, path, sse_events, until_closed)
        with self._lock:
            self._scripts.setdefault(key, []).append(s)

    def set_kimi_error(self, key: str, name: str, times: int | None = None, *,
                       envelope: str = "anthropic", headers: dict[str, str] | None = None,
                       add: bool = False, delay: float = 0.0,
                       path: str | None = MESSAGES_PATH) -> None:
        """Script one of ``KIMI_ERRORS`` for ``key`` (replacing its queue unless add)."""
        status, body = kimi_error(name, envelope=envelope)
        fn = self.add_response if add else self.set_response
        fn(key, status, body, headers, times, delay=delay, path=path)

    def clear_responses(self, key: str | None = None) -> None:
        with self._lock:
            if key is None:
                self._scripts.clear()
            else:
                self._scripts.pop(key, None)

    def set_default(self, status: int = 200,
                    body: dict | list | bytes | str | None = None,
                    headers: dict[str, str] | None = None, *, delay: float = 0.0,
                    path: str | None = MESSAGES_PATH,
                    sse_events: list[tuple[str, Any]] | None = None) -> None:
        """Answer for keys with no matching script (``set_default()`` = success)."""
        with self._lock:
            self._default = Script(status, body, headers, None, delay, path, sse_events)

    def set_usage(self, key: str, *, five_hour_reset: Any = None, weekly_reset: Any = None,
                  five_hour_limit: int | None = None, five_hour_used: int | None = None,
                  weekly_limit: int | None = None, weekly_used: int | None = None,
                  parallel_limit: int | None = None, level: str | None = None) -> None:
        """Override fields of ``key``'s /usages answer. Reset times: datetime, epoch
        seconds or an RFC 3339 string."""
        with self._lock:
            u = self._usage.setdefault(key, {})
            for name, val in (("five_hour_reset", five_hour_reset),
                              ("weekly_reset", weekly_reset),
                              ("five_hour_limit", five_hour_limit),
                              ("five_hour_used", five_hour_used),
                              ("weekly_limit", weekly_limit),
                              ("weekly_used", weekly_used),
                              ("parallel_limit", parallel_limit), ("level", level)):
                if val is not None:
                    u[name] = val

    def report_tokens(self, fresh: int, output: int, cache_read: int = 0, cache_write: int = 0) -> None:
        """Make every success report this usage, in its shape: Anthropic's input_tokens
        (`fresh`), cache_read_input_tokens, cache_creation_input_tokens and output_tokens
        (message_start and message_delta when streamed); OpenAI's prompt_tokens (all
        three inputs), Kimi's cached_tokens and completion_tokens (when streamed, in the
        last chunk's choice, as Kimi sends it; the cache-write figure has no place there)."""
        with self._lock:
            self._tokens = {"fresh": fresh, "output": output, "cache_read": cache_read, "cache_write": cache_write}

    def tokens_reported(self) -> dict[str, dict[str, int]]:
        """Per key, the tokens its answers reported (sent whole or streamed to the end),
        as the proxy saves them: {input (all), output, cacheRead, cacheWrite}."""
        with self._lock:
            return {key: {n: counts[n] for n in ("input", "output", "cacheRead", "cacheWrite")}
                    for key, counts in self._reported.items()}

    def _report(self, key: str, fresh: int, output: int, read: int, write: int) -> None:
        with self._lock:
            counts = self._reported.setdefault(key, Counter())
            counts.update({"input": fresh + read + write, "output": output, "cacheRead": read, "cacheWrite": write})

    def hold_stream_after_first_event(self, key: str | None = None,
                                      timeout: float | None = None) -> StreamGate:
        """Park the next streaming success (for ``key``, or any key) after its first
        event until the returned gate is set."""
        g = StreamGate(key, self.gate_timeout if timeout is None else timeout)
        with self._lock:
            self._gates.append(g)
            self._all_gates.append(g)
        return g

    # -- inspection -----------------------------------------------------
    def keys_seen(self) -> list[str]:
        """Keys of all recorded requests, in order of arrival (None for keyless)."""
        with self._lock:
            return [r.key for r in self.requests]  # type: ignore[misc]

    def count_by_key(self) -> dict[str, int]:
        """Requests per key (all paths; counted even with record=False)."""
        with self._lock:
            return dict(self._counts)

    def message_requests(self) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.split("?")[0] == MESSAGES_PATH]

    def chat_requests(self) -> list[SeenRequest]:
        """Requests to /coding/v1/chat/completions, in order of arrival."""
        with self._lock:
            return [r for r in self.requests if r.path.split("?")[0] == CHAT_COMPLETIONS_PATH]

    def in_flight_by_key(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self._in_flight.items() if v}

    def max_in_flight_by_key(self) -> dict[str, int]:
        with self._lock:
            return dict(self._max_in_flight)

    def reset(self) -> None:
        """Forget requests, counts, scripts, usages and gates (not the default)."""
        with self._lock:
            self.requests.clear()
            self._counts.clear()
            self._scripts.clear()
            self._usage.clear()
            self._reported.clear()
            self._gates.clear()
            self._max_in_flight.clear()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``n`` requests have been answered completely."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if sum(1 for r in self.requests if r.done is not None) >= n:
                    return True
            time.sleep(0.005)
        return False

    # -- internals ------------------------------------------------------
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _record(self, h: _Handler, body: bytes) -> SeenRequest:
        raw = [(k, v) for k, v in h.headers.items()]
        low: dict[str, str] = {}
        for k, v in raw:
            lk = k.lower()
            low[lk] = f"{low[lk]}, {v}" if lk in low else v
        key = low.get("x-api-key") or None
        if key is None:
            auth = low.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                key = auth[7:].strip() or None
        now = time.time()
        with self._lock:
            seen = SeenRequest(next(self._numbers), h.command, origin_form(h.path), raw, low, key,
                               body, now, time.monotonic())
            self.total += 1
            if self.record:
                self.requests.append(seen)
            if key is not None:
                self._counts[key] += 1
                self._in_flight[key] += 1
                self._max_in_flight[key] = max(self._max_in_flight[key],
                                               self._in_flight[key])
        return seen

    def _finished(self, seen: SeenRequest) -> None:
        with self._lock:
            if seen.key is not None and seen.in_flight:
                self._in_flight[seen.key] -= 1
            seen.in_flight = False

    def _take_script(self, key: str, path: str) -> Script:
        with self._lock:
            queue = self._scripts.get(key, [])
            for i, s in enumerate(queue):
                if s.matches(path):
                    if s.times is not None:
                        s.times -= 1
                        if s.times <= 0:
                            queue.pop(i)
                    return s
            d = self._default
            return d if d.matches(path) else Script()

    def _take_gate(self, key: str | None) -> StreamGate | None:
        with self._lock:
            for i, g in enumerate(self._gates):
                if g.key is None or g.key == key:
                    return self._gates.pop(i)
        return None

    def _answer(self, h: _Handler, seen: SeenRequest) -> None:
        path = seen.path.split("?", 1)[0]
        if seen.key is None:
            return self._send_json(h, seen, 401, error_body(
                "invalid_authentication_error", "Invalid Authentication",
                envelope="openai" if path == CHAT_COMPLETIONS_PATH else "anthropic"))
        script = self._take_script(seen.key, path)
        if script.until_closed and _closed_within(h.connection, script.delay):
            seen.closed = time.monotonic()
            h.close_connection = True
            return None
        if script.delay and not script.until_closed:
            time.sleep(script.delay)
        if not script.is_success():
            if script.sse_events is not None:
                return self._send_sse(h, seen, script.sse_events, script.status,
                                      script.headers)
            return self._send_scripted(h, seen, script)
        if path == MESSAGES_PATH and seen.method == "POST":
            return self._messages(h, seen, script.headers)
        if path == CHAT_COMPLETIONS_PATH and seen.method == "POST":
            return self._chat_completions(h, seen, script.headers)
        if path == MODELS_PATH and seen.method in ("GET", "HEAD"):
            return self._send_json(h, seen, 200, self._models_body(), script.headers)
        if path == USAGES_PATH and seen.method in ("GET", "HEAD"):
            return self._send_json(h, seen, 200, self.usages_body(seen.key),
                                   script.headers)
        self._send_json(h, seen, 404, error_body(
            "not_found_error", f"Not found: {seen.method} {path}"))

    def _send_json(self, h: _Handler, seen: SeenRequest, status: int, obj: Any,
                   headers: dict[str, str] | None = None) -> None:
        seen.status = status
        extra = {"x-fake-kimi-request": str(seen.number), **(headers or {})}
        h.send_bytes(status, json.dumps(obj).encode(), "application/json", extra)

    def _send_scripted(self, h: _Handler, seen: SeenRequest, s: Script) -> None:
        if isinstance(s.body, (dict, list)) or s.body is None:
            body = s.body if s.body is not None else {}
            return self._send_json(h, seen, s.status, body, s.headers)
        payload = s.body.encode() if isinstance(s.body, str) else s.body
        headers = dict(s.headers or {})
        ctype = next((headers.pop(k) for k in list(headers) if k.lower() == "content-type"),
                     "text/plain; charset=utf-8")
        seen.status = s.status
        headers.setdefault("x-fake-kimi-request", str(seen.number))
        h.send_bytes(s.status, payload, ctype, headers)

    def _models_body(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "type": "model", "display_name": m,
                      "created_at": "2025-01-01T00:00:00Z", "owned_by": "moonshot"}
                     for m in self.models],
            "has_more": False,
        }

    def usages_body(self, key: str) -> dict:
        """The /usages answer for ``key`` (public so tests can compare)."""
        now = time.time()
        with self._lock:
            u = dict(self._usage.get(key, {}))
            sent = sum(1 for r in self.requests
                       if r.key == key and r.path.split("?")[0] == MESSAGES_PATH)
        wl = int(u.get("weekly_limit", 2048))
        wu = int(u.get("weekly_used", sent))
        fl = int(u.get("five_hour_limit", 200))
        fu = int(u.get("five_hour_used", sent))
        return {
            "user": {"membership": {"level": u.get("level", "LEVEL_ADVANCED")}},
            "usage": {"limit": str(wl), "used": str(wu), "remaining": str(max(0, wl - wu)),
                      "resetTime": rfc3339(u.get("weekly_reset", now + 7 * 86400))},
            "limits": [{
                "window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                "detail": {"limit": str(fl), "used": str(fu),
                           "remaining": str(max(0, fl - fu)),
                           "resetTime": rfc3339(u.get("five_hour_reset", now + 5 * 3600))},
            }],
            "parallel": {"limit": str(int(u.get("parallel_limit", 30)))},
        }

    def _messages(self, h: _Handler, seen: SeenRequest,
                  headers: dict[str, str] | None) -> None:
        try:
            req = json.loads(seen.body or b"null")
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return self._send_json(h, seen, 400, error_body(
                "invalid_request_error", "request body must be a JSON object"))
        model = str(req.get("model") or "kimi-for-coding")
        text = f"hello from fake kimi #{seen.number}"
        in_tokens = max(1, len(json.dumps(req.get("messages", ""))) // 4)
        msg_id = f"msg_fake_{seen.number:06d}"
        tokens = self._tokens
        out_tokens = len(text.split()) if tokens is None else tokens["output"]
        usage: dict[str, int] = {"input_tokens": in_tokens}
        if tokens is not None:
            usage = {"input_tokens": tokens["fresh"], "cache_read_input_tokens": tokens["cache_read"],
                     "cache_creation_input_tokens": tokens["cache_write"]}
        assert seen.key is not None
        self._report(seen.key, usage["input_tokens"], out_tokens, usage.get("cache_read_input_tokens", 0),
                     usage.get("cache_creation_input_tokens", 0))
        if req.get("stream") is True:
            words = text.split(" ")
            n = min(self.deltas, len(words))
            per = -(-len(words) // n)
            parts = [" ".join(words[i:i + per]) for i in range(0, len(words), per)]
            parts = [p + (" " if i < len(parts) - 1 else "") for i, p in enumerate(parts)]
            if self.deltas > len(words):  # more deltas asked than words: empty ones (bench loads)
                parts += [""] * (self.deltas - len(parts))
            events: list[tuple[str, Any]] = [
                ("message_start", _message_start(msg_id, model, in_tokens, usage)),
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
            ]
            events += [("content_block_delta",
                        {"type": "content_block_delta", "index": 0,
                         "delta": {"type": "text_delta", "text": p}}) for p in parts]
            events += [
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "end_turn",
                                             "stop_sequence": None},
                                   "usage": {"output_tokens": out_tokens}}),
                ("message_stop", {"type": "message_stop"}),
            ]
            return self._send_sse(h, seen, events, 200, headers, gated=True)
        body = {
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {**usage, "output_tokens": out_tokens},
        }
        self._send_json(h, seen, 200, body, headers)

    def _chat_completions(self, h: _Handler, seen: SeenRequest,
                          headers: dict[str, str] | None) -> None:
        try:
            req = json.loads(seen.body or b"null")
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return self._send_json(h, seen, 400, error_body(
                "invalid_request_error", "request body must be a JSON object", envelope="openai"))
        model = str(req.get("model") or "kimi-for-coding")
        text = f"hello from fake kimi #{seen.number}"
        in_tokens = max(1, len(json.dumps(req.get("messages", ""))) // 4)
        base = {"id": f"chatcmpl-fake-{seen.number:06d}", "created": int(time.time()), "model": model}
        tokens = self._tokens
        out_tokens = len(text.split()) if tokens is None else tokens["output"]
        usage: dict[str, int] = {"prompt_tokens": in_tokens, "completion_tokens": out_tokens,
                                 "total_tokens": in_tokens + out_tokens}
        if tokens is not None:
            prompt = tokens["fresh"] + tokens["cache_read"] + tokens["cache_write"]
            usage = {"prompt_tokens": prompt, "completion_tokens": out_tokens,
                     "total_tokens": prompt + out_tokens, "cached_tokens": tokens["cache_read"]}
        assert seen.key is not None
        streamed = req.get("stream") is True
        if not streamed or tokens is not None:  # a stream reports usage only when asked to
            self._report(seen.key, usage["prompt_tokens"] - usage.get("cached_tokens", 0), out_tokens,
                         usage.get("cached_tokens", 0), 0)
        if streamed:
            words = text.split(" ")
            chunks: list[tuple[str, Any]] = [("", {
                **base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None}]})]
            chunks += [("", {**base, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": {"content": w + (" " if i < len(words) - 1 else "")},
                                          "finish_reason": None}]})
                       for i, w in enumerate(words)]
            last: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": "stop"}
            if tokens is not None:
                last["usage"] = usage  # Kimi's place for it: the last chunk's choice
            chunks += [("", {**base, "object": "chat.completion.chunk", "choices": [last]}),
                       ("", "[DONE]")]
            return self._send_sse(h, seen, chunks, 200, headers, gated=True)
        body = {
            **base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": usage,
        }
        self._send_json(h, seen, 200, body, headers)

    def _send_sse(self, h: _Handler, seen: SeenRequest, events: list[tuple[str, Any]],
                  status: int, headers: dict[str, str] | None, gated: bool = False) -> None:
        chunked = self.stream_framing == "chunked"
        seen.status = status
        h.send_response(status)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("x-fake-kimi-request", str(seen.number))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        h.wfile.flush()
        gate = self._take_gate(seen.key) if gated else None
        if gate is not None:
            gate.claimed_by = seen.number
        for i, (name, data) in enumerate(events):
            if name == CUT_STREAM:  # the connection breaks here: no end of the body
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            payload = data if isinstance(data, (bytes, str)) else json.dumps(data)
            if isinstance(payload, str):
                payload = payload.encode()
            # A nameless event is a bare data line (the OpenAI stream's form).
            named = b"event: " + name.encode() + b"\n" if name else b""
            frame = named + b"data: " + payload + b"\n\n"
            if chunked:
                frame = b"%x\r\n" % len(frame) + frame + b"\r\n"
            if i and self.event_delay:
                time.sleep(self.event_delay)
            h.wfile.write(frame)
            h.wfile.flush()
            if i == 0 and gate is not None:
                gate._park()
        if chunked:
            h.write_last(b"0\r\n\r\n")


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.fake_kimi", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--event-delay", type=float, default=0.0,
                    help="seconds between SSE events (default 0)")
    ap.add_argument("--stream-framing", choices=("chunked", "close"), default="chunked")
    ap.add_argument("--deltas", type=int, default=4,
                    help="text deltas per streamed Messages answer (default 4; events = deltas + 5)")
    ap.add_argument("--no-record", action="store_true",
                    help="do not keep a log of requests (long benchmarks)")
    ap.add_argument("--verbose", action="store_true", help="log each request to stderr")
    ap.add_argument("--refuse-key", action="append", default=[], metavar="KEY",
                    help="answer every request with this key 429 (rate limited, for 1 ms: retry-after-ms: 1); repeatable")
    args = ap.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost"):
        ap.error("refusing to listen on a non-loopback address")
    kimi = FakeKimi(args.host, args.port, event_delay=args.event_delay,
                    stream_framing=args.stream_framing, deltas=args.deltas, record=not args.no_record,
                    verbose=args.verbose).start()
    for key in args.refuse_key:
        kimi.set_kimi_error(key, "too_many_requests", headers={"retry-after-ms": "1"})
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    print(f"listening on {args.host}:{kimi.port}", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        kimi.stop()
        print(f"stopped after {kimi.total} requests", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
