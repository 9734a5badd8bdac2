"""The pipelined connection (`RedisLine`) on a real redis-server: calls in flight at once
each get their own answer, on one connection; an error answer fails only its call; a
server that lost its scripts gets them again; a server that does not answer, or is
gone, fails every waiting call fast and the line connects afresh when it is back; a
caller cancelled mid-flight leaves the others' answers in step; the URL's password
holds; close fails what waits."""

from __future__ import annotations

import asyncio

import pytest
import redis

from rotator.store.redis_line import RedisLine, Script
from rotator.store.redis_store import RedisStore
from testbed.redis_server import RedisServer

ECHO = Script("return {KEYS[1], ARGV[1]}")
# Keeps the server from answering anyone for ARGV[1] iterations.
# Keeps the server busy for ARGV[1] microseconds by its own clock (a counted loop took
# anywhere from 0.2 to 2 s on these machines, and the test needs it longer than 0.3 s).
BUSY = Script(
    "local t = redis.call('TIME') local stop = t[1] * 1000000 + t[2] + tonumber(ARGV[1]) "
    "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop return 1"
)


def line_to(redis_server: RedisServer, timeout_s: float = 1.0) -> RedisLine:
    return RedisLine(RedisStore(redis_server.url).new_async_connections(), timeout_s)


def clients(redis_server: RedisServer) -> int:
    return int(redis_server.command("INFO", "clients")["connected_clients"])


async def test_calls_in_flight_at_once_each_get_their_own_answer_on_one_connection(redis_server):
    line = line_to(redis_server)
    before = clients(redis_server)
    answers = await asyncio.gather(*(line.run(ECHO, [f"k{i}"], [i]) for i in range(200)))
    assert answers == [[f"k{i}".encode(), str(i).encode()] for i in range(200)]
    assert clients(redis_server) == before + 1
    await line.close()


async def test_an_error_answer_fails_its_call_only(redis_server):
    line = line_to(redis_server)
    await line.call("SET", "text", "not a number")
    results = await asyncio.gather(line.call("INCR", "n"), line.call("INCR", "text"), line.call("INCR", "n"),
                                   return_exceptions=True)
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], redis.ResponseError) and "not an integer" in str(results[1])
    await line.close()


async def test_a_server_that_lost_its_scripts_gets_them_again(redis_server):
    line = line_to(redis_server)
    assert await line.run(ECHO, ["a"], [1]) == [b"a", b"1"]
    redis_server.command("SCRIPT", "FLUSH")
    assert await line.run(ECHO, ["b"], [2]) == [b"b", b"2"]
    assert redis_server.command("SCRIPT", "EXISTS", ECHO.sha) == [True]
    await line.close()


async def test_no_answer_in_time_fails_every_waiting_call_and_the_next_connects_afresh(redis_server):
    line = line_to(redis_server, timeout_s=0.3)
    assert await line.run(BUSY, [], [1]) == 1  # loaded: the busy one below is one EVALSHA
    before = clients(redis_server)
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(line.run(BUSY, [], [2_000_000]), line.call("PING"), return_exceptions=True)
    waited = asyncio.get_running_loop().time() - started
    assert all(isinstance(r, redis.TimeoutError) for r in results), results
    assert waited < 1.5  # the busy script runs 2 s
    # Once the server answers again, the line works on a new connection.
    for _ in range(100):
        try:
            if await line.call("PING") == b"PONG":
                break
        except redis.TimeoutError:
            pass
    assert await line.run(ECHO, ["c"], [3]) == [b"c", b"3"]
    assert clients(redis_server) == before
    await line.close()


async def test_a_server_gone_fails_fast_and_the_line_comes_back_with_it(redis_server):
    line = line_to(redis_server)
    assert await line.call("PING") == b"PONG"
    redis_server.stop()
    started = asyncio.get_running_loop().time()
    with pytest.raises(redis.ConnectionError):
        await line.call("PING")
    with pytest.raises(redis.ConnectionError):  # refused at connect
        await line.call("PING")
    assert asyncio.get_running_loop().time() - started < 2.0
    redis_server.start()  # same port
    assert await line.call("PING") == b"PONG"
    await line.close()


async def test_a_caller_cancelled_in_flight_leaves_the_others_in_step(redis_server):
    line = line_to(redis_server)
    calls = [asyncio.ensure_future(line.run(ECHO, [f"k{i}"], [i])) for i in range(20)]
    await asyncio.sleep(0)  # all sent
    calls[5].cancel()
    calls[11].cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    for i, result in enumerate(results):
        if i in (5, 11):
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result == [f"k{i}".encode(), str(i).encode()]
    assert await line.run(ECHO, ["after"], [0]) == [b"after", b"0"]
    await line.close()


@pytest.mark.slow
async def test_the_urls_password_holds(tmp_path):
    with_password = RedisServer(tmp_path, password="s3cret-pass")
    with_password.start()
    try:
        line = line_to(with_password)
        assert await line.call("SET", "x", "1") == b"OK"
        assert with_password.command("GET", "x") == b"1"
        await line.close()
        wrong = RedisLine(RedisStore(with_password.url.replace("s3cret-pass", "wrong")).new_async_connections())
        with pytest.raises(redis.AuthenticationError):
            await wrong.call("PING")
        await wrong.close()
    finally:
        with_password.stop()


async def test_close_fails_what_waits_and_every_later_call(redis_server):
    line = line_to(redis_server, timeout_s=5.0)
    assert await line.run(BUSY, [], [1]) == 1
    waiting = asyncio.ensure_future(line.run(BUSY, [], [1_000_000]))  # busy 1 s
    await asyncio.sleep(0.05)
    await line.close()
    with pytest.raises(redis.ConnectionError):
        await waiting
    with pytest.raises(redis.ConnectionError):
        await line.call("PING")
