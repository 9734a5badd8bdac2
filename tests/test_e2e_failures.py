"""End to end, failures: a real mitmdump with the addon, the fake Kimi server, httpx.

Everything runs on 127.0.0.1 in reverse mode (the fixture points the proxy at the fake
server and treats 127.0.0.1 as the Kimi host). Each test reads what the client got,
what the fake server saw (``message_requests`` counts only ``/coding/v1/messages``, so
the addon's ``/coding/v1/usages`` probes never count as attempts) and what the addon
wrote to the accounts file (stopping the proxy makes its final save).

Figures are chosen so the outcome does not depend on timing:
- Per-key cooldowns use two keys, or 403 bodies, because rate limits on three
  different keys within 5 s are read as a global throttle (one shared pause instead).
- ``kimi_max_attempts`` defaults to every key once plus one more after waiting (at
  most 5): a request that every key refused waits up to ``kimi_max_wait`` for the
  first key to free up. Tests that want an immediate honest 429 set kimi_max_wait=0.
"""

from __future__ import annotations

import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from rotator.core.keys import mask_key, mask_key_ascii
from testbed.fake_kimi import (
    MESSAGES_PATH,
    USAGES_PATH,
    FakeKimi,
    kimi_error,
)
from testbed.processes import Proxy, start_mitmdump
from tests.support.accounts import fake_key
from tests.support.e2e import CLIENT_HEADERS, CLIENT_TIMEOUT_S, FILE_DEADLINE_S, MSG, client, messages_by, send
from tests.support.harness import ADDON_SCRIPT, LOOPBACK_DNS, counts_on_disk, poll, run_cli, saved_flows, sse_events
from tests.support.harness import accounts_on_disk as accounts


# -- helpers -------------------------------------------------------------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000




def assert_complete_stream(events: list[tuple[str | None, Any]]) -> None:
    """A whole, well-formed Anthropic message stream from the fake server."""
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"], names
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"], names
    deltas = names[2:-3]
    assert deltas and set(deltas) == {"content_block_delta"}, names
    for name, data in events:
        assert data["type"] == name
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    assert text.startswith("hello from fake kimi #"), text


def error_message(response: httpx.Response) -> str:
    body = response.json()
    assert body["type"] == "error", body
    return body["error"]["message"]


def alert_lines(proxy: Proxy, *needles: str) -> list[str]:
    return [line for line in proxy.output().splitlines() if all(n in line for n in needles)]


@pytest.fixture
def two_keys() -> list[str]:
    return [fake_key(f"key{i}") for i in range(2)]


# -- 1. a rate-limited key and a weekly-limited key: every request still succeeds ----------


def test_limited_keys_are_skipped_and_cooled_with_exact_resets(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "overloaded")  # 429, rate-limit wording, forever
    fake_kimi.set_kimi_error(keys[1], "weekly")  # 403 weekly window, forever
    weekly_reset_s = int(time.time()) + 3 * 86400 + 1234  # not the 7-day estimate
    fake_kimi.set_usage(keys[1], weekly_reset=weekly_reset_s)
    proxy = start_proxy(fake_kimi)

    with client() as c:
        for i in range(50):
            streamed = i % 2 == 0  # the first one, retried twice, is a stream
            r = send(c, proxy, stream=streamed)
            assert r.status_code == 200, (i, r.text)
            if streamed:
                assert r.headers["content-type"].startswith("text/event-stream")
                assert_complete_stream(sse_events(r.text))
            else:
                assert r.json()["content"][0]["text"].startswith("hello from fake kimi #")

    # The /usages probe replaces the weekly estimate with Kimi's exact reset.
    def key1_exact() -> bool:
        return accounts(accounts_path)[1]["rateLimitResetTime"] == weekly_reset_s * 1000

    assert poll(key1_exact, FILE_DEADLINE_S), accounts(accounts_path)[1]
    assert proxy.stop() == 0, proxy.output()

    on_disk = accounts(accounts_path)
    limited_at = messages_by(fake_kimi, keys[0])[0].time * 1000
    assert abs(on_disk[0]["rateLimitResetTime"] - (limited_at + 60_000)) < 3_000, on_disk[0]
    assert on_disk[1]["rateLimitResetTime"] == weekly_reset_s * 1000, on_disk[1]
    # The probe went out with the exhausted key, as Bearer, and is not an attempt.
    probes = [r for r in fake_kimi.requests if r.path.split("?")[0] == USAGES_PATH]
    assert [p.key for p in probes] == [keys[1]]
    assert probes[0].headers["authorization"] == f"Bearer {keys[1]}"
    counts = counts_on_disk(accounts_path)
    for key in keys:
        seen = messages_by(fake_kimi, key)
        assert counts[key] == (len(seen), sum(r.status == 200 for r in seen)), (key, counts)
    assert [len(messages_by(fake_kimi, k)) for k in keys] == [1, 1, 50]
    # One line per state change, not one per request.
    assert len(alert_lines(proxy, mask_key(keys[0]), "cooling for")) == 1, proxy.output()
    assert len(alert_lines(proxy, mask_key(keys[1]), "cooling for")) == 1, proxy.output()
    assert len(alert_lines(proxy, mask_key(keys[1]), "Kimi says its limit resets")) == 1, proxy.output()


# -- 2. every key exhausted ---------------------------------------------------------------


def test_every_key_rate_limited_gives_one_honest_429(
    fake_kimi, two_keys, write_accounts, start_proxy
):
    keys = two_keys  # two keys: no global-throttle pause, each key cools on its own
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "overloaded", headers={"retry-after": "9"})
    fake_kimi.set_kimi_error(keys[1], "overloaded", headers={"retry-after": "4"})
    proxy = start_proxy(fake_kimi, options={"kimi_max_wait": "0"})

    with client() as c:
        r = send(c, proxy)
        assert r.status_code == 429, r.text
        # The soonest key is key 1: 4 s from its 429, a moment ago.
        free_at = messages_by(fake_kimi, keys[1])[0].time + 4
        assert abs(int(r.headers["retry-after"]) - (free_at - time.time())) <= 1, r.headers
        message = error_message(r)
        for key in keys:
            assert mask_key(key) in message, message
            assert key not in r.text
        assert "free in" in message
        assert len(fake_kimi.message_requests()) == 2  # each key once, then the 429

        # Every key is cooling now: the next request is answered without going upstream.
        again = send(c, proxy)
        assert again.status_code == 429
        assert abs(int(again.headers["retry-after"]) - (free_at - time.time())) <= 1
        assert len(fake_kimi.message_requests()) == 2


def test_every_key_weekly_limited_429_uses_the_exact_resets(
    fake_kimi, two_keys, write_accounts, start_proxy, accounts_path
):
    keys = two_keys
    write_accounts(keys, "round-robin")
    now_s = int(time.time())
    resets = [now_s + 2 * 86400, now_s + 86400 + 600]  # key 1 frees first
    for key, reset in zip(keys, resets):
        fake_kimi.set_kimi_error(key, "weekly")
        fake_kimi.set_usage(key, weekly_reset=reset)
    proxy = start_proxy(fake_kimi, options={"kimi_max_wait": "0"})

    with client() as c:
        first = send(c, proxy)
        assert first.status_code == 429, first.text
        exact = [reset * 1000 for reset in resets]
        assert poll(lambda: [a["rateLimitResetTime"] for a in accounts(accounts_path)] == exact, FILE_DEADLINE_S), (
            accounts(accounts_path)
        )
        r = send(c, proxy)
    assert r.status_code == 429, r.text
    assert abs(int(r.headers["retry-after"]) - (resets[1] - time.time())) <= 1, r.headers
    message = error_message(r)
    for key in keys:
        assert mask_key(key) in message, message
    assert len(fake_kimi.message_requests()) == 2


def test_request_waits_for_a_cooling_key_within_max_wait(
    fake_kimi, two_keys, write_accounts, start_proxy
):
    keys = two_keys
    write_accounts(keys, "round-robin")
    for key in keys:  # one 429 each, then normal answers
        fake_kimi.set_kimi_error(key, "overloaded", times=1, headers={"retry-after": "2"})
    proxy = start_proxy(fake_kimi, options={"kimi_max_wait": "5"})

    with client() as c:
        # Both keys refuse it, then it waits for the soonest to cool down and succeeds
        # there (the default attempts: every key once, plus one after the wait).
        started = time.monotonic()
        r = send(c, proxy)
        waited = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert 1.5 <= waited < 5.0, waited  # waited for the cooldown, within kimi_max_wait
    seen = fake_kimi.message_requests()
    assert [s.status for s in seen] == [429, 429, 200]
    cooled_until = min(s.time for s in seen[:2]) + 2
    assert seen[2].time >= cooled_until - 0.05, "sent to a key still cooling"


# -- 3. a revoked key is disabled until enable-key; clear-limits ends cooldowns only ----------


def wait_until_used(c: httpx.Client, proxy: Proxy, fake: FakeKimi, key: str, times: int,
                    within: float) -> float:
    """Send requests until the fake has seen `key` `times` times; seconds it took."""
    started = time.monotonic()

    def used() -> bool:
        if len(messages_by(fake, key)) >= times:
            return True
        assert send(c, proxy).status_code == 200
        return False

    poll(used, within, interval=0.05)
    return time.monotonic() - started


def test_disabled_and_cooling_keys_come_back_only_through_the_cli(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "invalid_auth")  # 401, forever
    fake_kimi.set_kimi_error(keys[1], "overloaded", times=1)  # cools key 1 for 60 s
    proxy = start_proxy(fake_kimi)

    with client() as c:
        for _ in range(7):
            r = send(c, proxy)
            assert r.status_code == 200, r.text
        assert len(messages_by(fake_kimi, keys[0])) == 1  # the 401, then never again
        assert len(messages_by(fake_kimi, keys[1])) == 1  # the 429, then cooling
        assert poll(lambda: accounts(accounts_path)[0].get("disabledReason")
                    and accounts(accounts_path)[1]["rateLimitResetTime"] > now_ms(),
                    FILE_DEADLINE_S), accounts(accounts_path)
        assert len(alert_lines(proxy, mask_key(keys[0]), "disabled")) == 1, proxy.output()
        fake_kimi.clear_responses(keys[0])  # both keys would work again now

        # clear-limits ends the cooldown (picked up without a restart) ...
        done = run_cli(accounts_path, "clear-limits", "all")
        assert done.returncode == 0, done.stderr
        took = wait_until_used(c, proxy, fake_kimi, keys[1], 2, within=4.0)
        assert len(messages_by(fake_kimi, keys[1])) == 2, f"key 1 still cooling {took:.1f} s after clear-limits"
        # ... but does not re-enable a disabled key.
        for _ in range(3):
            assert send(c, proxy).status_code == 200
        assert len(messages_by(fake_kimi, keys[0])) == 1

        done = run_cli(accounts_path, "enable-key", "0")
        assert done.returncode == 0, done.stderr
        assert "Enabled" in done.stdout, done.stdout
        took = wait_until_used(c, proxy, fake_kimi, keys[0], 2, within=4.0)
    used_again = messages_by(fake_kimi, keys[0])
    assert len(used_again) == 2, f"key 0 not used within {took:.1f} s of enable-key"
    assert used_again[-1].status == 200
    assert proxy.stop() == 0
    assert accounts(accounts_path)[0].get("disabledReason") is None


# -- 4 and 8. answers that are not the key's fault reach the client as they are -------------


def test_refusals_that_are_not_the_keys_fault_pass_through_unretried(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    write_accounts(keys, "round-robin")
    # Kimi admits coding agents only: every key would be refused the same way.
    fake_kimi.set_kimi_error(keys[0], "client_identity")
    fake_kimi.set_kimi_error(keys[1], "server_error")  # 500
    fake_kimi.set_kimi_error(keys[2], "unavailable")  # 503
    proxy = start_proxy(fake_kimi)

    with client() as c:
        answers = [send(c, proxy) for _ in keys]
    for answer, name in zip(answers, ("client_identity", "server_error", "unavailable")):
        assert (answer.status_code, answer.json()) == kimi_error(name), answer.text
    assert [s.key for s in fake_kimi.message_requests()] == keys  # one each: no retry
    assert proxy.stop() == 0

    identity, server_error, unavailable = accounts(accounts_path)
    assert identity["healthScore"] == 100, identity  # no penalty at all
    assert identity["consecutiveFailures"] == 0, identity
    assert server_error["healthScore"] == 80, server_error
    assert server_error["consecutiveFailures"] == 1, server_error
    assert unavailable["healthScore"] == 95, unavailable
    for account in (identity, server_error, unavailable):
        assert account["rateLimitResetTime"] == 0, account  # none cooling
        assert account.get("cooldownLevel", 0) == 0, account
        assert account.get("disabledReason") is None, account
    assert counts_on_disk(accounts_path) == {key: (1, 0) for key in keys}


# -- 5. a burst of rate limits on every key is a global throttle -------------------------------


def test_rate_limits_on_every_key_pause_once_without_penalties(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    write_accounts(keys, "round-robin")
    for key in keys:  # a short burst: one 429 per key, then normal answers
        fake_kimi.set_kimi_error(key, "overloaded", times=1)
    # Three attempts trip the throttle; the fourth, after the 10-s pause, is served.
    proxy = start_proxy(fake_kimi, options={"kimi_max_attempts": "4", "kimi_max_wait": "20"})

    started = time.monotonic()
    with client() as c:
        r = send(c, proxy)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert 8.0 <= took < 20.0, took  # waited out the shared pause, within kimi_max_wait
    seen = fake_kimi.message_requests()
    assert [s.status for s in seen] == [429, 429, 429, 200]
    assert seen[3].time - seen[2].time >= 9.5  # nothing sent during the pause
    assert proxy.stop() == 0, proxy.output()

    # The first two keys were announced as cooling before the third 429 showed a burst;
    # the one throttle line says their cooldowns were dropped. The file shows no penalty.
    assert len(alert_lines(proxy, "throttling")) == 1, proxy.output()
    for account in accounts(accounts_path):
        assert account["rateLimitResetTime"] == 0, account
        assert account["healthScore"] == 100, account
        assert account["consecutiveFailures"] == 0, account
        assert account.get("cooldownLevel", 0) == 0, account


# -- 6. every attempt is visible, in the flow and in a saved dump ------------------------------


def test_saved_dump_lists_every_attempt_without_keys(
    fake_kimi, keys, write_accounts, start_proxy, tmp_path
):
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "too_many_requests")
    fake_kimi.set_kimi_error(keys[1], "concurrency")
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, extra_args=("-w", str(dump)))

    with client() as c:
        r = send(c, proxy)
    assert r.status_code == 200, r.text
    assert [s.key for s in fake_kimi.message_requests()] == keys
    assert proxy.stop() == 0, proxy.output()

    raw, flows = saved_flows(dump)
    for key in keys:
        assert key.encode() not in raw
    # Every saved flow is the addon's, and each shows a masked key.
    assert all("kimi_rotator" in f.metadata for f in flows), [f.metadata for f in flows]
    for f in flows:
        assert f.request.headers["x-api-key"] in {mask_key_ascii(k) for k in keys}
    originals = [f for f in flows if "retry_of" not in f.metadata["kimi_rotator"]]
    assert len(originals) == 1, [f.metadata for f in flows]
    original = originals[0]
    expected = [(0, "rate_limited"), (1, "concurrency_limit"), (2, "success")]
    attempts = original.metadata["kimi_rotator"]["attempts"]
    assert [(a["index"], a["outcome"]) for a in attempts] == expected, attempts
    for attempt, (index, _) in zip(attempts, expected):
        assert attempt["account"] == f"Account {index}"
        assert attempt["key"] == mask_key(keys[index])
    assert original.response.status_code == 200
    # The client's flow shows the key that answered, in its header and its comment.
    assert original.request.headers["x-api-key"] == mask_key_ascii(keys[2])
    assert original.comment.startswith("kimi-rotator: [0] ") and f"({mask_key(keys[2])}): ok" in original.comment

    replays = [f for f in flows if f.metadata.get("kimi_rotator", {}).get("retry_of") == original.id]
    assert len(replays) == 2, [f.metadata for f in flows]
    for replay, (index, outcome) in zip(replays, expected[1:]):
        # (mitmproxy's own replays also carry is_replay == "request"; the addon's do not,
        # see test_retry_works_behind_proxyauth.)
        record = replay.metadata["kimi_rotator"]["attempts"]
        assert [(a["index"], a["outcome"]) for a in record] == [(index, outcome)]
        assert replay.request.headers["x-api-key"] == mask_key_ascii(keys[index])


# -- 7. SSE: streamed when the first key serves, whole when a retry does ----------------------


def test_sse_streams_on_first_key_and_arrives_whole_after_a_retry(
    fake_kimi, two_keys, write_accounts, start_proxy
):
    keys = two_keys
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi)

    with client() as c:
        # First key succeeds: the client has the first event while the rest is held back.
        gate = fake_kimi.hold_stream_after_first_event(keys[0])
        with c.stream("POST", proxy.url + MESSAGES_PATH, json={**MSG, "stream": True},
                      headers=CLIENT_HEADERS) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = sse_events(lines, limit=1)  # up to the blank line that ends it
            assert gate.wait_reached(5) and not gate.is_set() and not gate.timed_out
            assert [name for name, _ in first] == ["message_start"], first
            gate.set()
            rest = sse_events(lines)
        assert not gate.timed_out
        assert_complete_stream(first + rest)

        # First key (now key 1) rate limited, key 0 serves the stream. A retried attempt
        # is buffered by the addon and handed to the original flow whole: the client
        # gets the complete SSE body at once, not event by event.
        fake_kimi.set_kimi_error(keys[1], "overloaded", times=1)
        r = send(c, proxy, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("\n\n")
    assert_complete_stream(sse_events(r.text))
    assert [(s.key, s.status) for s in fake_kimi.message_requests()] == [
        (keys[0], 200), (keys[1], 429), (keys[0], 200)
    ]


# -- 9. the in-flight cap per key --------------------------------------------------------------


def test_in_flight_cap_holds_per_key(fake_kimi, two_keys, write_accounts, start_proxy):
    keys = two_keys
    write_accounts(keys, "round-robin")
    delay = 0.4
    for key in keys:
        fake_kimi.set_response(key, delay=delay)  # normal answers, slowly
    proxy = start_proxy(fake_kimi, options={"kimi_max_in_flight": "1"})

    started = time.monotonic()
    with client() as c, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: send(c, proxy), range(6)))
    took = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * 6
    assert len(fake_kimi.message_requests()) == 6  # waited for a key, never refused
    assert took >= 2.5 * delay, took  # three rounds of two
    for key in keys:
        # At most one in flight per key: each request reached the fake only after the
        # previous one on that key had been answered, which takes `delay`. (Read from
        # arrival times: the fake's own in-flight counter drops only after its handler
        # thread finishes, which may be a moment after the proxy got the whole answer.)
        arrivals = [r.monotonic for r in messages_by(fake_kimi, key)]
        assert arrivals, key
        gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
        assert all(gap >= delay - 0.01 for gap in gaps), (key, gaps)


# -- extra: concurrent 429s on one key are one cooldown, not a run of them ------------------


def test_concurrent_rate_limits_on_one_key_cool_it_once(
    fake_kimi, two_keys, write_accounts, start_proxy, accounts_path
):
    keys = two_keys  # one limited key: no global throttle
    write_accounts(keys, "round-robin")
    status, body = kimi_error("overloaded")
    fake_kimi.set_response(keys[0], status, body, delay=0.5)  # both 429s come back together
    proxy = start_proxy(fake_kimi)

    barrier = threading.Barrier(4)

    def one(_: int) -> int:
        barrier.wait(5)
        return send(c, proxy).status_code

    with client() as c, ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, range(4)))
    assert statuses == [200] * 4
    limited = messages_by(fake_kimi, keys[0])
    assert len(limited) == 2  # round-robin put two of the four on key 0 at once
    assert proxy.stop() == 0
    key0 = accounts(accounts_path)[0]
    # One cooldown, started by the first 429: 60 s from then, level 1 (not 120 s, level 2).
    assert key0["rateLimitResetTime"] <= max(r.time for r in limited) * 1000 + 0.5e3 + 62_000, key0
    assert key0.get("cooldownLevel") == 1, key0


# -- extra: retrying behind mitmproxy's proxyauth -------------------------------------------


def test_retry_works_behind_proxyauth(fake_kimi, two_keys, write_accounts, start_proxy, tmp_path):
    # proxyauth is what the README asks for before kimi_allow_remote.
    keys = two_keys
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "too_many_requests")
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, "regular", options={"proxyauth": "user:pass"},
                        extra_args=("-w", str(dump)))
    with httpx.Client(proxy=f"http://user:pass@127.0.0.1:{proxy.port}", trust_env=False,
                      timeout=CLIENT_TIMEOUT_S) as c:
        r = c.post("http://api.kimi.com" + MESSAGES_PATH, json=MSG, headers=CLIENT_HEADERS)
    assert proxy.stop() == 0
    assert r.status_code == 200, (r.status_code, r.text)
    assert [(s.key, s.status) for s in fake_kimi.message_requests()] == [(keys[0], 429), (keys[1], 200)]
    replays = [f for f in saved_flows(dump)[1] if "retry_of" in f.metadata.get("kimi_rotator", {})]
    assert [f.is_replay for f in replays] == ["request"]


# -- half-open recovery and growing cooldowns ------------------------------------------------


def test_key_failing_again_after_its_cooldown_cools_twice_as_long(
    fake_kimi, two_keys, write_accounts, start_proxy, accounts_path
):
    keys = two_keys
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "overloaded", times=2, headers={"retry-after-ms": "400"})
    proxy = start_proxy(fake_kimi)

    with client() as c:
        assert send(c, proxy).status_code == 200  # key 0: 429, cools 0.4 s; key 1 serves
        # Key 1 serves until key 0's cooldown is over; then key 0 gets one: 429 again.
        wait_until_used(c, proxy, fake_kimi, keys[0], 2, within=5.0)
    again = messages_by(fake_kimi, keys[0])
    assert [s.status for s in again] == [429, 429]
    assert proxy.stop() == 0
    key0 = accounts(accounts_path)[0]
    assert key0.get("cooldownLevel") == 2, key0
    # The wiring: the second cooldown in a row outlasts the 0.4 s announced (exactly twice
    # it, on the fake clock: tests/test_pool.py
    # test_an_announced_reset_grows_too_when_it_follows_another_cooldown).
    cooled_for = key0["rateLimitResetTime"] - again[1].time * 1000
    assert cooled_for > 400, (cooled_for, key0)


def test_recovering_key_takes_one_request_at_a_time(
    fake_kimi, two_keys, write_accounts, start_proxy, accounts_path
):
    keys = two_keys
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "overloaded", times=1, headers={"retry-after-ms": "400"})
    fake_kimi.add_response(keys[0], delay=1.2)  # then slow successes
    fake_kimi.set_response(keys[1], times=1)
    fake_kimi.add_response(keys[1], delay=1.2)
    proxy = start_proxy(fake_kimi)  # flushes every 0.2 s

    with client() as c:
        assert send(c, proxy).status_code == 200  # key 0: 429, cools 0.4 s; key 1 serves
        # Wait out key 0's cooldown: until the deadline the proxy set, as it saved it.
        reset_ms = poll(lambda: accounts(accounts_path)[0]["rateLimitResetTime"], FILE_DEADLINE_S)
        assert reset_ms, accounts(accounts_path)
        time.sleep(max(0.0, reset_ms / 1000 - time.time()) + 0.01)
        results: list[int] = []

        def one() -> None:
            results.append(send(c, proxy).status_code)

        threads = [threading.Thread(target=one) for _ in range(3)]
        threads[0].start()  # round-robin: key 0, back from its cooldown (half-open)
        # A flush saves that request while it is still in flight (the fake holds it 1.2 s).
        assert poll(lambda: counts_on_disk(accounts_path)[keys[0]][0] == 2, timeout=1.0)
        threads[1].start()  # key 1
        assert poll(lambda: len(messages_by(fake_kimi, keys[1])) == 2, 5), fake_kimi.keys_seen()
        threads[2].start()  # key 0 is still on its one trial request: key 1 again
        for t in threads:
            t.join(CLIENT_TIMEOUT_S)
    assert results == [200] * 3
    assert fake_kimi.max_in_flight_by_key()[keys[0]] == 1, fake_kimi.max_in_flight_by_key()


def test_retry_goes_out_through_the_same_upstream_proxy_and_tls_trust(
    fake_kimi, two_keys, write_accounts, accounts_path, tmp_path
):
    """A corporate setup: our proxy forwards to an upstream proxy whose CA it must trust.

    The retried attempt must take the same way as the first, or it fails for such users.
    """
    keys = two_keys
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "overloaded", times=1)
    corporate_dump = tmp_path / "corporate.flows"
    corporate = start_mitmdump(
        addons=[LOOPBACK_DNS], options={"loopback_dns_port": str(fake_kimi.port)},
        confdir=tmp_path / "corporate", extra_args=("-w", str(corporate_dump)),
    )
    ours = None
    try:
        ours = start_mitmdump(
            addons=[ADDON_SCRIPT],
            mode=f"upstream:http://127.0.0.1:{corporate.port}",
            options={
                "kimi_accounts": str(accounts_path),
                # The upstream proxy intercepts TLS: trust its CA, as such users must.
                "ssl_verify_upstream_trusted_ca": str(corporate.ca_cert),
                "kimi_status": "off",  # quota polling stays on (its default): it must go the same way
            },
            confdir=tmp_path / "ours",
        )
        trust_ours = ssl.create_default_context(cafile=str(ours.ca_cert))
        with httpx.Client(proxy=ours.url, verify=trust_ours, trust_env=False, timeout=CLIENT_TIMEOUT_S) as c:
            r = c.post("https://api.kimi.com" + MESSAGES_PATH, json=MSG, headers=CLIENT_HEADERS)
        assert r.status_code == 200, (r.text, ours.output())
        seen = fake_kimi.message_requests()
        assert [(s.key, s.status) for s in seen] == [(keys[0], 429), (keys[1], 200)]

        def polled() -> list[str]:
            return sorted(r.key for r in fake_kimi.requests if r.path == USAGES_PATH)

        assert poll(lambda: polled() == sorted(keys), 10), (polled(), ours.output())
        assert "has crashed" not in ours.output()  # a poll must come in through the proxy's mode
    finally:
        if ours is not None:
            ours.stop()
        corporate.stop()
    # Both attempts went through the corporate proxy, in TLS it terminated with the CA
    # we were told to trust (a retry sent any other way would have failed or bypassed it).
    _, all_flows = saved_flows(corporate_dump)
    flows = [f for f in all_flows if f.request.path == MESSAGES_PATH]
    assert [f.metadata["loopback_dns.original"] for f in flows] == [["https", "api.kimi.com", 443]] * 2
    assert [f.client_conn.tls_established for f in flows] == [True, True]
    assert [f.request.headers["x-api-key"] for f in flows] == keys  # each attempt its own key
    # The quota polls, flows of the proxy's own, took the same way.
    polls = [f for f in all_flows if f.request.path == USAGES_PATH]
    assert sorted(f.request.headers["authorization"] for f in polls) == sorted(f"Bearer {k}" for k in keys)
    assert all(f.client_conn.tls_established for f in polls)
