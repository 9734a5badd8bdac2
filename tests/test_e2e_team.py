"""Real mitmdump proxies sharing one pool through a real redis-server, in front of the
fake Kimi server; everything on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from rotator.admin import ops
from rotator.core.keys import mask_key
from rotator.store.redis_store import RedisStore
from testbed.processes import Proxy
from testbed.redis_server import RedisServer
from tests.support.e2e import FLUSH_DEADLINE_S, client, counts_in_redis, send
from tests.support.harness import counts_seen, poll

def test_three_proxies_count_exactly_and_see_cli_changes(redis_server, fake_kimi, start_proxy, keys):
    store = RedisStore(redis_server.url)
    for i, key in enumerate(keys[:2]):
        ops.run(store, ops.add_key(key, f"K{i}", i + 1))
    ops.run(store, ops.set_strategy("round-robin", 10))
    proxies = [start_proxy(fake_kimi, options={"kimi_store": redis_server.url}) for _ in range(3)]
    with client() as c, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: send(c, proxies[i % 3]), range(60)))
    assert all(a.status_code == 200 for a in answers)
    seen = counts_seen(fake_kimi, keys)
    assert sum(total for total, _ in seen.values()) == 60
    assert poll(lambda: counts_in_redis(redis_server.url, keys) == seen, FLUSH_DEADLINE_S), (
        counts_in_redis(redis_server.url, keys), seen)

    # A person's change through the CLI (a third key) reaches every proxy: round robin
    # puts it on one of each proxy's next requests.
    import rotator.cli.main as cli
    assert cli.main(["--store", redis_server.url, "add-key", keys[2], "K2"]) == 0
    with client() as c:
        for proxy in proxies:
            def uses_new_key() -> bool:
                before = fake_kimi.count_by_key().get(keys[2], 0)
                send(c, proxy)
                return fake_kimi.count_by_key().get(keys[2], 0) > before
            assert poll(uses_new_key, 3, interval=0.1)


def test_unreachable_at_start_answers_503_then_serves(tmp_path, fake_kimi, start_proxy, keys):
    (tmp_path / "redis").mkdir()
    srv = RedisServer(tmp_path / "redis")
    proxy = start_proxy(fake_kimi, options={"kimi_store": srv.url})
    with client() as c:
        answer = send(c, proxy)
        assert answer.status_code == 503
        assert "team store unreachable at redis://127.0.0.1" in answer.text
        srv.start()
        try:
            ops.run(RedisStore(srv.url), ops.add_key(keys[0], "K0", 1))
            assert poll(lambda: send(c, proxy).status_code == 200, FLUSH_DEADLINE_S, interval=0.2)
        finally:
            srv.stop()


def test_redis_away_under_load_costs_no_request_and_counts_end_exact(redis_server, fake_kimi, start_proxy, keys):
    import time

    store = RedisStore(redis_server.url)
    for i, key in enumerate(keys):
        ops.run(store, ops.add_key(key, f"K{i}", i + 1))
    proxies = [start_proxy(fake_kimi, options={"kimi_store": redis_server.url}) for _ in range(2)]
    with client() as c:
        assert all(send(c, p).status_code == 200 for p in proxies)
        redis_server.stop(keep_data=True)
        statuses = []
        away_until = time.monotonic() + 5  # the outage's length, not an ordering wait
        with ThreadPoolExecutor(4) as pool:
            while time.monotonic() < away_until:
                statuses += [a.status_code for a in pool.map(lambda i: send(c, proxies[i % 2]), range(8))]
        redis_server.start()
        assert statuses and set(statuses) == {200}
    seen = counts_seen(fake_kimi, keys)
    assert poll(lambda: counts_in_redis(redis_server.url, keys) == seen, FLUSH_DEADLINE_S), (
        counts_in_redis(redis_server.url, keys), seen)



def _lose_the_pool(redis_server: RedisServer, how: str) -> None:
    if how == "flushall":
        redis_server.command("FLUSHALL")
    else:  # a restart without persistence: the server comes back empty
        redis_server.stop()
        redis_server.start()


def _counts_shown(proxy: Proxy, keys: list[str]) -> dict[str, tuple[int, int]]:
    """(total, successful) per key as the proxy's status page shows its pool (memory)."""
    base = proxy.wait_for_output(r"status page at (http://127\.0\.0\.1:\d+)/", 5)
    assert base is not None, proxy.output()
    with urllib.request.urlopen(base.group(1) + "/status.json", timeout=5) as answer:
        shown = {k["maskedKey"]: (k["requests"], k["successfulRequests"]) for k in json.loads(answer.read())["keys"]}
    return {k: shown.get(mask_key(k), (0, 0)) for k in keys}


@pytest.mark.parametrize("how", ["flushall", "restart"])
def test_redis_losing_its_data_costs_no_key_and_no_count(redis_server, fake_kimi, start_proxy, keys, how):
    store = RedisStore(redis_server.url)
    for i, key in enumerate(keys[:2]):
        ops.run(store, ops.add_key(key, f"K{i}", i + 1))
    options = {"kimi_store": redis_server.url, "kimi_status": "127.0.0.1:0"}
    proxies = [start_proxy(fake_kimi, options=options) for _ in range(2)]
    with client() as c:
        assert [send(c, proxies[i % 2]).status_code for i in range(8)] == [200] * 8
        # Each proxy has saved its counts and read the other's: its memory is the pool.
        for proxy in proxies:
            assert poll(lambda: _counts_shown(proxy, keys) == counts_seen(fake_kimi, keys), FLUSH_DEADLINE_S)
        marks = [len(p.output()) for p in proxies]
        _lose_the_pool(redis_server, how)
        answers = [send(c, proxies[i % 2]).status_code for i in range(8)]
        # The pool is back in Redis (a proxy put it back), and more requests go through.
        assert poll(lambda: redis_server.command("GET", "kimi-rotator:accounts") is not None, FLUSH_DEADLINE_S)
        answers += [send(c, proxies[i % 2]).status_code for i in range(8)]
    assert answers == [200] * 16
    seen = counts_seen(fake_kimi, keys)
    assert sum(total for total, _ in seen.values()) == 24
    assert poll(lambda: counts_in_redis(redis_server.url, keys) == seen, FLUSH_DEADLINE_S), (
        counts_in_redis(redis_server.url, keys), seen)
    logs = [p.output()[mark:] for p, mark in zip(proxies, marks)]
    assert not any("removed)" in log for log in logs), logs
    said = [line for log in logs for line in log.splitlines() if "lost the pool" in line]
    assert said and all(f"{redis_server.url} lost the pool" in line for line in said), logs
    assert all(log.count("lost the pool") <= 1 for log in logs), logs
