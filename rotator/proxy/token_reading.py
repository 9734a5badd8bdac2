"""What each answer the proxy passes spent, read from Kimi's `usage` (rotator.tokens):
a streamed answer's chunks on their way to the client (`StreamReader`, decoded when
gzip or deflate), a buffered answer's body in the `response` hook (`spent`).

A stream is never held back: the reader is mitmproxy's `response.stream` callable, which
hands each chunk on unchanged after a scan. An answer in another coding (br, zstd)
streams as always and counts nothing; that is said once per process.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable

from mitmproxy import http

from rotator.proxy import bodies
from rotator.proxy.headers import is_event_stream
from rotator.tokens import Shape, Usage, UsageScanner, from_event_stream, from_json_answer, shape_for_path
from rotator.tokens.usage import MAX_ANSWER_BYTES

logger = logging.getLogger(__name__)

INFLATE_STEP = 1 << 20  # a compressed chunk is inflated at most this much at a time
_GZIP_WBITS = 47  # a gzip or zlib header, told apart by zlib itself
_ZLIB_WBITS = 15
_RAW_WBITS = -15
_told_codings: set[str] = set()


class StreamReader(UsageScanner):
    """A `response.stream` callable: each chunk is scanned for usage and handed on
    unchanged; `result()` is what the stream reported (a stream cut short: so far). An
    answer as sent is fed to the scanner as it is called, one call a chunk (mitmproxy
    calls it for every chunk of every stream); one in gzip or deflate is decoded first
    (`_DecodingReader`: `new_reader` makes the one an answer needs)."""

    __slots__ = ()
    __call__ = UsageScanner.feed


def new_reader(shape: Shape, coding: str = "") -> StreamReader:
    """The reader of an answer of `shape` in content coding `coding` ("", gzip, x-gzip
    or deflate)."""
    return _DecodingReader(shape, coding) if coding else StreamReader(shape)


class _DecodingReader(StreamReader):
    """A StreamReader for an answer in gzip or deflate: each chunk is inflated (at most
    `INFLATE_STEP` at a time) for the scanner and handed on still compressed."""

    __slots__ = ("_inflate", "_deflate", "_broken")

    def __init__(self, shape: Shape, coding: str) -> None:
        super().__init__(shape)
        self._deflate = coding == "deflate"  # zlib or raw deflate: told by the first byte
        self._inflate: zlib._Decompress | None = None  # type: ignore[name-defined]
        if coding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(_GZIP_WBITS)
        self._broken = False

    def __call__(self, chunk: bytes) -> bytes:
        if not self._broken:
            try:
                self._inflate_and_feed(chunk)
            except Exception:  # a broken body (zlib.error, …): it streams on, counted no further
                self._broken = True
                logger.debug("kimi-rotator: a streamed answer could not be read for tokens", exc_info=True)
        return chunk

    def _inflate_and_feed(self, chunk: bytes) -> None:
        if self._deflate and self._inflate is None and chunk:
            # RFC 9110's deflate is zlib-wrapped; some servers send it raw.
            self._inflate = zlib.decompressobj(_ZLIB_WBITS if chunk[0] & 0x0F == 8 else _RAW_WBITS)
        inflate = self._inflate
        if inflate is None:
            self.feed(chunk)
            return
        if not chunk:
            self.feed(inflate.flush())
            self.feed(b"")
            return
        data = chunk
        while data:
            out = inflate.decompress(data, INFLATE_STEP)
            if out:
                self.feed(out)
            data = inflate.unconsumed_tail

    def result(self) -> Usage | None:
        return None if self._broken else super().result()


def stream_reader(flow: http.HTTPFlow) -> StreamReader | None:
    """The reader for a success about to stream, or None: a path whose answers carry no
    usage, or a coding read as nothing (said once)."""
    response = flow.response
    assert response is not None
    shape = shape_for_path(flow.request.path)
    if shape is None:
        return None
    coding = bodies.content_coding(response)
    if coding not in ("", "gzip", "x-gzip", "deflate"):
        if coding not in _told_codings:
            _told_codings.add(coding)
            logger.info("kimi-rotator: streamed answers in %r coding are not read for tokens", coding[:20])
        return None
    return new_reader(shape, coding)


def stream_callable(flow: http.HTTPFlow) -> Callable[[bytes], bytes] | None:
    """What `response.stream` is set to for a success about to stream: its reader's
    `__call__` as a bound method (mitmproxy calls it for every chunk, and calling the
    instance itself costs a slot look-up more each time), or None (`stream_reader`)."""
    reader = stream_reader(flow)
    return None if reader is None else reader.__call__


def reader_of(stream: object) -> StreamReader | None:
    """The usage reader of a `response.stream`: itself, the one its bound method belongs
    to (`stream_callable`), or the one a relay to a held client answer carries
    (rotator.proxy.attempts.Relay)."""
    if isinstance(stream, StreamReader):
        return stream
    reader = getattr(stream, "__self__", None) or getattr(stream, "reader", None)
    return reader if isinstance(reader, StreamReader) else None


def spent(flow: http.HTTPFlow) -> Usage | None:
    """What the answer of `flow` (a success) reported it spent: read by its stream reader
    while it streamed, or from its whole body (JSON, or SSE held whole: our resends)."""
    response = flow.response
    if response is None:
        return None
    stream = response.stream
    reader = reader_of(stream) if stream else None
    if reader is not None:
        return _result(reader)
    if stream:
        return None
    shape = shape_for_path(flow.request.path)
    if shape is None:
        return None
    body = bodies.body_start(response, limit=MAX_ANSWER_BYTES)
    if not body:
        return None
    if is_event_stream(response.headers):
        return from_event_stream(body, shape)
    return from_json_answer(body, shape)


def cut_short(flow: http.HTTPFlow) -> Usage | None:
    """What a stream that ended in an error had reported before it ended."""
    response = flow.response
    reader = None if response is None else reader_of(response.stream)
    return None if reader is None else _result(reader)


def _result(reader: StreamReader) -> Usage | None:
    usage = reader.result()
    if reader.fault is not None:
        logger.debug("kimi-rotator: a streamed answer could not be read for tokens", exc_info=reader.fault)
    return usage
