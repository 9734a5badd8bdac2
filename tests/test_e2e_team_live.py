"""The live state a team shares on one Redis, with real mitmdump proxies and a real
redis-server in front of the fake Kimi: a key's in-flight cap holds for every proxy,
a killed proxy's slots expire, and a change (a CLI's, another proxy's cooldown or
disabled key) reaches every proxy within a second, and a throttle one proxy sees, or the
team sees spread over its proxies, pauses every proxy. Everything on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

import rotator.cli.main as cli
from rotator.admin import ops
from rotator.store.redis_store import RedisStore
from rotator.store.urls import slots_key
from testbed.processes import Proxy
from tests.support.accounts import fake_key
from tests.support.e2e import client, send
from tests.support.harness import counts_seen, poll

SEEN_WITHIN_S = 1.0
# Saves far apart: only the team's notices can make a change seen within a second.
SLOW_SAVES = {"kimi_flush_interval": "5"}


def _pool(url: str, keys: list[str], strategy: str = "round-robin") -> RedisStore:
    store = RedisStore(url)
    for i, key in enumerate(keys):
        ops.run(store, ops.add_key(key, f"K{i}", i + 1))
    ops.run(store, ops.set_strategy(strategy, 10))
    return store


def test_three_proxies_keep_each_keys_cap_for_the_whole_team(redis_server, fake_kimi, start_proxy, keys):
    two = keys[:2]
    _pool(redis_server.url, two)
    fake_kimi.set_default(delay=0.25)  # slow answers: requests pile up on each key
    options = {"kimi_store": redis_server.url, "kimi_max_in_flight": "2"}
    proxies = [start_proxy(fake_kimi, options=options) for _ in range(3)]
    requests = 48
    with client() as c, ThreadPoolExecutor(18) as pool:  # 6 clients per proxy, 12 > 2 keys × 2
        answers = list(pool.map(lambda i: send(c, proxies[i % 3]), range(requests)))
    assert [a.status_code for a in answers] == [200] * requests
    most = fake_kimi.max_in_flight_by_key()
    # Each proxy alone would allow 2 per key: 6 in all. The team allows 2, and reaches it.
    assert {key: most.get(key) for key in two} == {two[0]: 2, two[1]: 2}, most
    seen = counts_seen(fake_kimi, two)
    assert sum(total for total, _ in seen.values()) == requests
    # Every slot was given back.
    assert poll(lambda: all(redis_server.command("ZCARD", slots_key("kimi-rotator:", k)) == 0 for k in two), 5)


def test_a_killed_proxys_slots_expire(redis_server, fake_kimi, start_proxy, keys):
    key = keys[0]
    _pool(redis_server.url, [key])
    options = {"kimi_store": redis_server.url, "kimi_max_in_flight": "1", "kimi_slot_ttl": "1", **SLOW_SAVES}
    doomed, survivor = (start_proxy(fake_kimi, options=options) for _ in range(2))
    fake_kimi.set_response(key, 200, times=1, delay=8)  # the doomed proxy's request hangs upstream
    hung = threading.Thread(target=_send_ignoring_errors, args=(doomed,), daemon=True)
    hung.start()
    assert poll(lambda: fake_kimi.in_flight_by_key().get(key) == 1, 10)
    slots = slots_key("kimi-rotator:", key)
    assert redis_server.command("ZCARD", slots) == 1  # the doomed proxy holds the key's one slot
    doomed.process.kill()
    doomed.process.wait(5)
    started = time.monotonic()
    with client() as c:
        answer = send(c, survivor)  # waits for the slot (kimi_max_wait 30 s), then goes
    waited = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert fake_kimi.count_by_key()[key] == 2
    # Not before the dead proxy's slot expired (1 s after its last refresh), not long after.
    assert 0.3 < waited < 5, waited


def _send_ignoring_errors(proxy: Proxy) -> None:
    try:
        with client() as c:
            send(c, proxy)
    except httpx.HTTPError:
        pass  # its proxy is killed under it


def _uses(c: httpx.Client, proxy: Proxy, fake, key: str) -> bool:
    """Whether one of two requests through `proxy` goes out with `key` (round robin on
    two keys: a usable key gets one of any two)."""
    before = fake.count_by_key().get(key, 0)
    for _ in range(2):
        assert send(c, proxy).status_code == 200
    return fake.count_by_key().get(key, 0) > before


def _avoids(c: httpx.Client, proxy: Proxy, fake, key: str) -> bool:
    return not _uses(c, proxy, fake, key)


def _send_until_refused(c: httpx.Client, proxy: Proxy, fake, status: int) -> None:
    """Send through `proxy` until Kimi's one scripted refusal has been given (the proxy
    retries it on another key: the client sees a 200)."""
    def refused() -> bool:
        assert send(c, proxy).status_code == 200
        return any(r.status == status for r in fake.message_requests())
    assert poll(refused, 5, interval=0)


def _all_within(check, proxies: list[Proxy], started: float) -> list[float]:
    """How long after `started` each proxy first passed `check` (fails past the second)."""
    took = []
    for proxy in proxies:
        left = started + SEEN_WITHIN_S - time.monotonic()
        assert left > 0 and poll(lambda: check(proxy), left, interval=0.01), (
            f"not seen within {SEEN_WITHIN_S} s by {proxy.url}")
        took.append(time.monotonic() - started)
    return took


def test_changes_reach_every_proxy_within_a_second(redis_server, fake_kimi, start_proxy, keys):
    k0, k1, k2 = keys
    _pool(redis_server.url, [k0, k1])
    options = {"kimi_store": redis_server.url, **SLOW_SAVES}
    proxies = [start_proxy(fake_kimi, options=options) for _ in range(3)]
    with client() as c:
        assert all(_uses(c, p, fake_kimi, k0) for p in proxies)

        # Another proxy's cooldown: Kimi refuses k0 once, through proxy 0 only.
        fake_kimi.set_kimi_error(k0, "too_many_requests", times=1, headers={"retry-after": "60"})
        fake_kimi.add_response(k0, 200)
        _send_until_refused(c, proxies[0], fake_kimi, 429)
        started = time.monotonic()
        _all_within(lambda p: _avoids(c, p, fake_kimi, k0), proxies[1:], started)

        # A person's change from the CLI: the cooldown cleared, a key added, one removed.
        assert cli.main(["--store", redis_server.url, "clear-limits", "all"]) == 0
        started = time.monotonic()
        _all_within(lambda p: _uses(c, p, fake_kimi, k0), proxies, started)

        assert cli.main(["--store", redis_server.url, "remove-key", "1"]) == 0
        assert cli.main(["--store", redis_server.url, "add-key", k2, "K2"]) == 0
        started = time.monotonic()
        _all_within(lambda p: _uses(c, p, fake_kimi, k2) and _avoids(c, p, fake_kimi, k1), proxies, started)

        # Another proxy's disabled key (Kimi says the key is not valid), and the CLI's enable.
        fake_kimi.set_kimi_error(k0, "invalid_auth", times=1)
        fake_kimi.add_response(k0, 200)
        _send_until_refused(c, proxies[1], fake_kimi, 401)
        started = time.monotonic()
        _all_within(lambda p: _avoids(c, p, fake_kimi, k0), [proxies[0], proxies[2]], started)
        assert cli.main(["--store", redis_server.url, "enable-key", "0"]) == 0
        started = time.monotonic()
        _all_within(lambda p: _uses(c, p, fake_kimi, k0), proxies, started)


def test_a_throttle_one_proxy_sees_pauses_the_team(redis_server, fake_kimi, start_proxy, keys):
    _pool(redis_server.url, keys)
    # A pause (10 s) longer than a request may wait: a paused proxy answers at once.
    options = {"kimi_store": redis_server.url, "kimi_max_wait": "1", **SLOW_SAVES}
    watcher, limited = (start_proxy(fake_kimi, options=options) for _ in range(2))
    with client() as c:
        assert send(c, watcher).status_code == 200
        # Every key refused at once through one proxy: Kimi throttles the account, not a key.
        for key in keys:
            fake_kimi.set_kimi_error(key, "too_many_requests")
        answer = send(c, limited)
        assert answer.status_code == 429
        assert limited.wait_for_output("pausing all keys", timeout=5)
        started = time.monotonic()
        for key in keys:
            fake_kimi.clear_responses(key)
        # The other proxy pauses too, within a second: it answers itself.
        assert poll(lambda: send(c, watcher).status_code in (429, 503), SEEN_WITHIN_S, interval=0.01)
        assert time.monotonic() - started < SEEN_WITHIN_S
        before = len(fake_kimi.message_requests())
        answer = send(c, watcher)
    assert answer.status_code in (429, 503), answer.text
    assert "paus" in answer.text or "throttl" in answer.text.lower(), answer.text
    assert len(fake_kimi.message_requests()) == before  # nothing sent upstream while paused


def test_a_throttle_spread_over_the_team_is_seen_and_pauses_it(redis_server, fake_kimi, start_proxy, keys):
    """Kimi refuses three keys within 5 s, each through a different proxy: no proxy saw a
    throttle alone, the team did (each tells the others of its rate limits)."""
    pool_keys = [*keys, fake_key("key3")]  # a fourth key: each proxy's own retry is served
    _pool(redis_server.url, pool_keys)
    options = {"kimi_store": redis_server.url, "kimi_max_wait": "1", **SLOW_SAVES}
    proxies = [start_proxy(fake_kimi, options=options) for _ in range(3)]
    with client() as c:
        assert all(send(c, p).status_code == 200 for p in proxies)
        last: list[int] = []
        for proxy, key in zip(proxies, keys):
            refusals = sum(r.status == 429 for r in fake_kimi.message_requests())
            fake_kimi.set_kimi_error(key, "too_many_requests", times=1)

            def refused(proxy: Proxy = proxy, refusals: int = refusals) -> bool:
                last.append(send(c, proxy).status_code)
                return sum(r.status == 429 for r in fake_kimi.message_requests()) > refusals

            # Through this proxy only, until Kimi gave its one refusal.
            assert poll(refused, 4, interval=0)
            if key != keys[-1]:  # one key's refusal: charged to it, retried on another
                assert last[-1] == 200
        assert not any("pausing all keys" in p.output() for p in proxies[:2])
        started = time.monotonic()
        # The proxy that saw the third refusal, or one that heard of it, pauses the team.
        _all_within(lambda p: send(c, p).status_code in (429, 503), proxies, started)
        assert any("pausing all keys" in p.output() for p in proxies)
        before = len(fake_kimi.message_requests())
        answers = [send(c, p) for p in proxies]
    assert [a.status_code in (429, 503) for a in answers] == [True] * 3, [a.text for a in answers]
    assert len(fake_kimi.message_requests()) == before  # nothing sent upstream while paused
