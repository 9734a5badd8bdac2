"""One pipelined connection to a Redis server, for calls made on every request.

redis-py's asyncio client takes a connection from its pool for each call, wraps each
write and each read in a timeout task and sends nothing until the previous answer on
that connection came back: CPU time a call, most of it not Redis (bench/README.md). Here
every call is written at once on one connection (redis-py's own `Connection`, so the
URL's user, password, database and TLS hold as for any client), and one reader hands
the answers back in the order the calls went: Redis answers a connection's commands in
order. Each call has a timer rather than a task. A call that gets no answer in time, a
write that fails or an answer no call waits for breaks the line: every call waiting
fails (the server may still have run them) and the next call connects afresh.

Scripts go by their SHA1 (EVALSHA); one the server does not have (a new server, or one
restarted or flushed) is loaded first (SCRIPT LOAD: the pool's ACL user needs no EVAL).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio.connection

from rotator.core.background import Background
from rotator.store.redis_store import SOCKET_TIMEOUT_S

Connection = redis.asyncio.connection.AbstractConnection


class Script:
    """A Lua script as a line runs it: its source and its SHA1 (the server's name for it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class RedisLine:
    def __init__(self, new_connection: Callable[[], Connection], timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        """`new_connection`: an unconnected connection with no socket timeout of its own
        (the line times each call); one per connect, so closing a broken one can't cut
        the next."""
        self._new_connection = new_connection
        self.timeout_s = timeout_s
        self._connection: Connection | None = None  # connected, the reader running
        self._connecting: asyncio.Future[None] | None = None
        self._waiting: deque[tuple[asyncio.Future[Any], asyncio.TimerHandle]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._closing = Background()  # broken connections, closing
        self._closed = False

    async def run(self, script: Script, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self.call("SCRIPT", "LOAD", script.source)
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    async def call(self, *command: str | int) -> Any:
        """Send one command; its answer, or redis-py's error (ResponseError for an error
        answer, ConnectionError or TimeoutError when the line broke)."""
        connection = self._connection or await self._connect()
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        timer = loop.call_later(self.timeout_s, self._time_out)
        self._waiting.append((answer, timer))  # before the write: answers come in this order
        try:
            await connection.send_packed_command(connection.pack_command(*command), check_health=False)
        except BaseException as e:  # a write cut short leaves the stream out of step
            self._break(connection, e if isinstance(e, redis.RedisError) else redis.ConnectionError(f"write cut short ({e!r})"))
            if not isinstance(e, Exception):
                answer.cancel()  # failed by the break; nobody will read it
                raise
        return await answer

    async def close(self) -> None:
        self._closed = True
        self._break(self._connection, redis.ConnectionError("the line is closed"))
        await self._closing.stop(cancel=False)

    # -- the connection ------------------------------------------------------------
    async def _connect(self) -> Connection:
        if self._closed:
            raise redis.ConnectionError("the line is closed")
        if self._connecting is None:
            self._connecting = opening = asyncio.ensure_future(self._open())
            opening.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved
        # Shielded: one caller cancelled must not cancel the others' connect.
        await asyncio.shield(self._connecting)
        if self._connection is None:  # broken again already
            raise redis.ConnectionError("the connection broke as it opened")
        return self._connection

    async def _open(self) -> None:
        try:
            connection = self._new_connection()
            await connection.connect()
            if self._closed:  # while it opened
                await connection.disconnect(nowait=True)
                raise redis.ConnectionError("the line is closed")
            self._connection = connection
            self._reader = asyncio.get_running_loop().create_task(self._read(connection))
        finally:
            self._connecting = None

    async def _read(self, connection: Connection) -> None:
        while True:
            try:
                answer: Any = await connection.read_response(disconnect_on_error=False)
                failed = False
            except redis.ResponseError as e:
                answer, failed = e, True
            except Exception as e:
                self._break(connection, e if isinstance(e, redis.RedisError) else redis.ConnectionError(repr(e)))
                return
            if not self._waiting:
                self._break(connection, redis.ConnectionError("an answer no call waits for"))
                return
            waiter, timer = self._waiting.popleft()
            timer.cancel()
            if waiter.done():  # its caller was cancelled
                continue
            if failed:
                waiter.set_exception(answer)
            else:
                waiter.set_result(answer)

    def _time_out(self) -> None:
        self._break(self._connection, redis.TimeoutError(f"no answer within {self.timeout_s:g} s"))

    def _break(self, connection: Connection | None, error: redis.RedisError) -> None:
        """Every call waiting on `connection` fails with `error`; the next call connects
        afresh. Nothing happens if the line moved on from `connection` already."""
        if connection is not self._connection:
            return
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None
        if self._connection is not None:
            self._closing.start(self._connection.disconnect(nowait=True))
            self._connection = None
        waiting, self._waiting = self._waiting, deque()
        for waiter, timer in waiting:
            timer.cancel()
            if not waiter.done():
                waiter.set_exception(error)
