"""Bodies: reading an answer's body no further than the policy scans, and telling whether a
request's body is streamed (and so cannot be resent).

An error body is decoded incrementally and only up to `policy.BODY_SCAN_LIMIT` bytes:
`Response.get_content` would decode it whole first (a 300 KB gzip bomb is 300 MB) and
keep the result in mitmproxy's decoding cache. The body the client gets is changed only
to mask a pool key an error answer quotes back (`mask_echoed_key`).

With mitmproxy's `stream_large_bodies`, a request body over the limit, or of a size the
headers do not announce that then grows past it, is streamed: its headers go upstream
before the `request` hook runs, and its body is kept nowhere, so it cannot be resent.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from rotator.core.keys import mask_key
from rotator.core.policy import BODY_SCAN_LIMIT
from rotator.proxy.headers import mask_sent_key

logger = logging.getLogger(__name__)

Decoder = Callable[[bytes, int], bytes]


def _zlib(wbits: int) -> Decoder:
    def decode(data: bytes, limit: int) -> bytes:
        return zlib.decompressobj(wbits).decompress(data, limit)

    return decode


def _deflate(data: bytes, limit: int) -> bytes:
    # As mitmproxy: zlib-wrapped deflate, else raw deflate (servers send both).
    try:
        return _zlib(zlib.MAX_WBITS)(data, limit)
    except zlib.error:
        return _zlib(-zlib.MAX_WBITS)(data, limit)


def _brotli() -> Decoder | None:
    """Brotli only where it can stop at a limit (brotli >= 1.2's output_buffer_limit):
    a few bytes of brotli can expand to megabytes, so feeding it in slices bounds nothing."""
    try:
        import brotli
    except ImportError:  # pragma: no cover
        return None
    if not hasattr(brotli.Decompressor(), "can_accept_more_data"):
        return None

    def decode(data: bytes, limit: int) -> bytes:
        out: bytes = brotli.Decompressor().process(data, output_buffer_limit=limit)
        return out[:limit]

    return decode


def _zstd() -> Decoder | None:
    """Zstandard through whichever module the installed mitmproxy uses."""
    module: Any
    try:  # mitmproxy 12: compression.zstd (3.14) or its backport
        try:
            from compression import zstd as module  # type: ignore[import-not-found,no-redef]
        except ImportError:
            from backports import zstd as module  # type: ignore[import-not-found,no-redef]

        def decode_std(data: bytes, limit: int) -> bytes:
            out: bytes = module.ZstdDecompressor().decompress(data, max_length=limit)
            return out

        return decode_std
    except ImportError:
        pass
    try:  # mitmproxy 11: zstandard
        import io

        import zstandard
    except ImportError:  # pragma: no cover
        return None

    def decode_zstandard(data: bytes, limit: int) -> bytes:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        out = bytearray()
        while len(out) < limit and (chunk := reader.read(limit - len(out))):
            out += chunk
        return bytes(out)

    return decode_zstandard


DECODERS: dict[str, Decoder | None] = {
    "gzip": _zlib(32 + zlib.MAX_WBITS),  # gzip or zlib header, detected
    "x-gzip": _zlib(32 + zlib.MAX_WBITS),
    "deflate": _deflate,
    "br": _brotli(),
    "zstd": _zstd(),
}
# Encodings this installation cannot read safely (brotli before 1.2, as with mitmproxy
# 11): Kimi is not offered them, so its refusals stay readable and judged by their words.
UNREADABLE: frozenset[str] = frozenset(name for name, decode in DECODERS.items() if decode is None)


def body_start(response: http.Response, limit: int = BODY_SCAN_LIMIT) -> bytes | None:
    """At most `limit` bytes of `response`'s decoded body; never raises.

    A body that cannot be decoded, or is in an encoding we do not know, gives its raw
    start (as `get_content(strict=False)` would); one in an encoding whose decoder
    cannot stop at a limit gives None: nothing is read rather than everything.
    """
    raw = response.raw_content
    if not raw:
        return raw
    encoding = content_coding(response)
    if not encoding or encoding not in DECODERS:
        return raw[:limit]
    decode = DECODERS[encoding]
    if decode is None:
        return None
    try:
        return decode(raw, limit)
    except Exception:  # zlib.error, brotli.error, ZstdError...: a broken body
        return raw[:limit]


def content_coding(response: http.Response) -> str:
    """The answer's content coding, "" for none (identity). Read from the raw fields, as
    `Headers.get` would (several such headers joined by ", "): this runs for every
    streamed success, and a Headers lookup converts every name it passes."""
    codings = [value for name, value in response.headers.fields
               if len(name) == 16 and name.lower() == b"content-encoding"]
    if not codings:
        return ""
    encoding = b", ".join(codings).decode("utf-8", "surrogateescape").strip().lower()
    return "" if encoding == "identity" else encoding


def mask_echoed_key(response: http.Response, key: str, start: bytes | None) -> None:
    """Replace `key` in an error answer's headers and body with its masked form, so the
    client and saved flows never hold it even when Kimi quotes it back.

    `start` is the body as `body_start` read it. An encoded body holding the key is
    rewritten (re-encoded as it came) only when `start` is all of it; a longer one
    would have to be decoded whole first, which is what a bomb wants.
    """
    secret = key.encode()
    if any(secret in value for _, value in response.headers.fields):
        mask_sent_key(response.headers, key)
    raw = response.raw_content
    if not raw:
        return
    if not content_coding(response):
        if secret in raw:
            response.content = raw.replace(secret, mask_key(key).encode())
    elif start is not None and secret in start and len(start) < BODY_SCAN_LIMIT:
        response.content = start.replace(secret, mask_key(key).encode())


# -- streamed request bodies -----------------------------------------------------------


def may_stream(request: http.Request) -> bool:
    """Whether mitmproxy streams, or may yet stream, this request's body (given that
    `stream_large_bodies` is set): already decided, or a body whose size the headers do
    not announce (chunked, or HTTP/2 and 3 without content-length), which mitmproxy
    streams once what it has buffered passes the limit."""
    if request.stream:
        return True
    headers = request.headers
    if "content-length" in headers:
        return False
    return "transfer-encoding" in headers or request.is_http2 or request.is_http3


def is_streamed(request: http.Request) -> bool:
    """Its body went upstream as it came and was kept nowhere: it cannot be resent."""
    return bool(request.stream)


NOT_RESENT = "not retried: its body was streamed (over stream_large_bodies) and cannot be resent"
CLOSED = (
    "its body is streamed (over stream_large_bodies), and mitmproxy cannot answer a streamed "
    "request itself: connection closed"
)

_told_once = False


def tell_once_about_closing() -> None:
    """One log line per run on why some requests are closed rather than answered."""
    global _told_once
    if not _told_once:
        _told_once = True
        logger.warning(
            "kimi-rotator: a request with a body over stream_large_bodies could not be served "
            "(see its flow's comment) and was closed, not answered: mitmproxy cannot answer a "
            "request whose body it streams. Raise stream_large_bodies above your largest request "
            "to get the proxy's own answers."
        )
