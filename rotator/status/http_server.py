"""A small HTTP/1.1 server on asyncio streams for the status page: it reads one request
head within a size and time limit, hands it to a handler, writes the answer and closes.

No request body is ever read (the page answers GET and HEAD only), so a client cannot
make it buffer more than `MAX_HEAD` bytes or hold it longer than the timeouts; the
number of open connections is capped too. No mitmproxy here: the addon
(rotator.proxy.status_page) decides what each path answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # request line and headers together
MAX_HEADERS = 100
HEAD_TIMEOUT_S = 5.0  # to send the request's head
WRITE_TIMEOUT_S = 10.0  # to take the answer
MAX_CONNECTIONS = 32


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # names in lower case; the first value of a repeated one
    peer: Any  # (host, port, ...) as asyncio reports it


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


# An answer now, or an awaitable one (work handed to a thread, off the event loop).
Handler = Callable[[Request], "Response | Awaitable[Response]"]


def plain(status: int, text: str, *headers: tuple[str, str]) -> Response:
    return Response(status, (text + "\n").encode(), headers=headers)


class StatusServer:
    """`await start(host, port)` gives the bound (host, port); `await stop()` closes it
    and every connection still open."""

    def __init__(self, handler: Handler, common_headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.handler = handler
        self.common_headers = common_headers
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._open):
            writer.close()
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            await asyncio.wait_for(server.wait_closed(), WRITE_TIMEOUT_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open.add(writer)
        try:
            response = await self._answer(reader, writer.get_extra_info("peername"))
            if response is not None:
                writer.write(self._encode(response[0], response[1]))
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader, peer: Any) -> tuple[Response, bool] | None:
        """The answer and whether it carries its body (not for HEAD); None: just close."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return plain(431, "request head too large"), True
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            return None
        request = parse_head(head, peer)
        if request is None:
            return plain(400, "bad request"), True
        try:
            response = self.handler(request)
            if inspect.isawaitable(response):
                response = await response
        except Exception:  # the page must never take the proxy down
            logger.exception("kimi-rotator: status page: answering %s failed", request.path)
            response = plain(500, "internal error")
        return response, request.method != "HEAD"

    def _encode(self, response: Response, with_body: bool) -> bytes:
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = ""
        lines = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in (*self.common_headers, *response.headers)),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + response.body if with_body else head


def parse_head(head: bytes, peer: Any) -> Request | None:
    """The request in a head ending with a blank line; None if it is not HTTP/1.x."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover (latin-1 decodes any byte)
        return None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return None
    method, target, _ = parts
    if not method.isalpha() or len(lines) - 1 > MAX_HEADERS:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers.setdefault(name.lower(), value.strip())
    url = urlsplit(target)
    return Request(method, url.path, parse_qs(url.query), headers, peer)
