"""The status page's document (rotator.status.document) and its metrics (rotator.status.metrics), in
process: a real KeyPool on a fake clock, a Tally, timeline events; no proxy, no network."""

from __future__ import annotations

import json
import math

from prometheus_client.parser import text_string_to_metric_families

from rotator.core.models import Account, AccountsFile
from rotator.core.quota import QuotaReading, QuotaWindow
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.status import metrics
from rotator.status.document import snapshot, status_document
from rotator.status.tally import Tally
from rotator.status.timeline import Event
from testbed.hooks import FakeClock
from tests.support.accounts import fake_keys

KEYS = fake_keys(6)
MINUTE = 60_000


def pool_of(clock: FakeClock, *accounts: Account, strategy: str = "round-robin", active: int = 0) -> KeyPool:
    state = AccountsFile(accounts=list(accounts), rotation_strategy=strategy, active_index=active)
    return KeyPool(state, clock=clock)


def document(pool: KeyPool, clock: FakeClock, tally: Tally | None = None, events=()) -> dict:
    shot = snapshot(pool, tally or Tally(), list(events), clock.now_ms())
    doc = status_document(shot)
    json.dumps(doc, allow_nan=False)  # what the page serves: plain JSON
    return doc


def by_index(doc: dict) -> dict[int, dict]:
    return {k["index"]: k for k in doc["keys"]}


def test_each_state_with_its_deadline_and_reason() -> None:
    clock = FakeClock()
    now = clock.now_ms()
    pool = pool_of(
        clock,
        Account(key=KEYS[0], name="serving"),
        Account(key=KEYS[1], name="ready"),
        Account(key=KEYS[2], name="cooling", rate_limit_reset_time=now + 5 * MINUTE, cooldown_reason="rate limited"),
        Account(key=KEYS[3], name="disabled", disabled_reason="key revoked (401)"),
        Account(key=KEYS[4], name="half-open", cooldown_level=2, rate_limit_reset_time=now - 1),
        Account(key=KEYS[5], name="billing", billing_limit_reset_time=now + 60 * MINUTE),
    )
    keys = by_index(document(pool, clock))
    assert [keys[i]["state"] for i in range(6)] == ["serving", "ready", "cooling", "disabled", "half-open", "cooling"]
    assert keys[0]["active"] and not keys[1]["active"]
    assert keys[2]["untilMs"] == now + 5 * MINUTE and keys[2]["reason"] == "rate limited"
    assert keys[3]["reason"] == "key revoked (401)" and keys[3]["untilMs"] == 0
    assert keys[4]["reason"] is None and keys[4]["untilMs"] == 0
    assert keys[5]["untilMs"] == now + 60 * MINUTE and "billing" in keys[5]["reason"]
    assert keys[1]["reason"] is None and keys[1]["untilMs"] == 0

    clock.advance(5 * MINUTE)  # the cooldown is over: the key is ready again
    assert by_index(document(pool, clock))[2]["state"] == "ready"


def test_an_active_key_that_cannot_serve_is_not_serving() -> None:
    clock = FakeClock()
    pool = pool_of(clock, Account(key=KEYS[0], rate_limit_reset_time=clock.now_ms() + MINUTE), Account(key=KEYS[1]))
    keys = by_index(document(pool, clock))
    assert keys[0]["active"] and keys[0]["state"] == "cooling"
    assert keys[1]["state"] == "ready"


def test_health_low_health_and_numbers() -> None:
    clock = FakeClock()
    pool = pool_of(
        clock,
        Account(key=KEYS[0], health_score=20, last_used=clock.now_ms(), total_requests=8, successful_requests=6,
                response_times=[300, 100, 200]),
        Account(key=KEYS[1], total_requests=3, successful_requests=1, response_times=[10, 40, 20, 30]),
        Account(key=KEYS[2]),
    )
    keys = by_index(document(pool, clock))
    assert keys[0]["health"] == 20 and keys[0]["lowHealth"] and not keys[1]["lowHealth"]
    assert (keys[0]["requests"], keys[0]["successfulRequests"], keys[0]["successRate"]) == (8, 6, 75.0)
    assert keys[0]["medianLatencyMs"] == 200
    assert keys[1]["medianLatencyMs"] == 25 and keys[1]["successRate"] == 33.3
    assert keys[2]["successRate"] is None and keys[2]["medianLatencyMs"] is None


def test_the_success_rate_never_passes_100_percent() -> None:
    # More successes than requests: a file counted wrongly (issue 23, item 6) or edited by hand.
    clock = FakeClock()
    pool = pool_of(clock, Account(key=KEYS[0], total_requests=1, successful_requests=2),
                   Account(key=KEYS[1], total_requests=0, successful_requests=3))
    keys = by_index(document(pool, clock))
    assert (keys[0]["successRate"], keys[1]["successRate"]) == (100.0, None)


def test_in_flight_and_the_cap_follow_the_pool() -> None:
    clock = FakeClock()
    pool = pool_of(clock, Account(key=KEYS[0]), Account(key=KEYS[1]), strategy="sticky")
    pool.max_in_flight = 4
    leases = [pool.acquire(clock.now_ms()) for _ in range(3)]
    assert all(isinstance(lease, Lease) for lease in leases)
    keys = by_index(document(pool, clock))
    assert (keys[0]["inFlight"], keys[0]["cap"]) == (3, 4)
    assert (keys[1]["inFlight"], keys[1]["cap"]) == (0, 4)
    # Kimi's parallel limit, once read, caps the key below the proxy's own cap.
    pool.take_reading(KEYS[1], QuotaReading(taken_at=clock.now_ms(), parallel_limit=2), clock.now_ms())
    assert by_index(document(pool, clock))[1]["cap"] == 2
    pool.abandon(leases[0])
    assert by_index(document(pool, clock))[0]["inFlight"] == 2


def test_outcomes_retries_and_refusals_come_from_the_tally() -> None:
    clock = FakeClock()
    # KEYS[0] is listed twice: the second entry is never used, and nothing is counted on it.
    pool = pool_of(clock, Account(key=KEYS[0]), Account(key=KEYS[1]), Account(key=KEYS[0], name="again"))
    tally = Tally()
    for verdict in ("success", "success", "rate_limited"):
        tally.attempt_ended(KEYS[0], verdict)
    tally.attempt_ended(KEYS[1], "upstream_fault")
    tally.retried(KEYS[1])
    tally.retried(KEYS[1])
    tally.answered_itself("every key is cooling down")
    tally.answered_itself("client refused (403)")
    tally.answered_itself("client refused (403)")
    doc = document(pool, clock, tally)
    keys = by_index(doc)
    assert keys[0]["outcomes"] == {"success": 2, "rate_limited": 1} and keys[0]["retries"] == 0
    assert keys[1]["outcomes"] == {"upstream_fault": 1} and keys[1]["retries"] == 2
    assert keys[2]["outcomes"] == {} and keys[2]["state"] == "disabled" and "duplicate" in keys[2]["reason"]
    assert doc["refused"] == {"every key is cooling down": 1, "client refused (403)": 2}


def test_quota_windows_with_the_reading_time_and_parallel_limit() -> None:
    clock = FakeClock()
    now = clock.now_ms()
    reading = QuotaReading(
        taken_at=now - 30_000,
        windows=[
            QuotaWindow(minutes=300, limit=200, used=50, reset_time=now + 3_600_000),
            QuotaWindow(minutes=7 * 24 * 60, limit=2048, used=2048, remaining=0, reset_time=now + 86_400_000),
            QuotaWindow(minutes=None, used=3),
        ],
        parallel_limit=8,
    )
    pool = pool_of(clock, Account(key=KEYS[0], quota=reading), Account(key=KEYS[1]))
    keys = by_index(document(pool, clock))
    quota = keys[0]["quota"]
    assert quota["takenAt"] == now - 30_000 and quota["parallelLimit"] == 8
    assert quota["windows"] == [
        {"name": "5-hour", "minutes": 300, "limit": 200, "used": 50, "remaining": 150,
         "resetTime": now + 3_600_000, "remainingRatio": 0.75},
        {"name": "weekly", "minutes": 10080, "limit": 2048, "used": 2048, "remaining": 0,
         "resetTime": now + 86_400_000, "remainingRatio": 0.0},
        {"name": "unnamed", "minutes": None, "limit": None, "used": 3, "remaining": None,
         "resetTime": 0, "remainingRatio": None},
    ]
    # The spent weekly window cools the key until it resets (the pool steers by it).
    assert keys[0]["state"] == "cooling" and keys[0]["untilMs"] == now + 86_400_000
    assert keys[0]["cap"] == 8
    assert keys[1]["quota"] is None


def test_the_pool_strategy_pause_and_timeline_newest_first() -> None:
    clock = FakeClock()
    now = clock.now_ms()
    pool = pool_of(clock, Account(key=KEYS[0]), Account(key=KEYS[1]), strategy="health-based", active=1)
    pool.paused_until_ms = now + 10_000
    events = [Event(now - 1_000, "key [1] recovered"), Event(now - 5_000, "key [0] cooling for 60 s")]
    doc = document(pool, clock, events=events)
    assert (doc["now"], doc["strategy"], doc["activeIndex"], doc["pausedUntilMs"]) == (now, "health-based", 1, now + 10_000)
    assert doc["timeline"] == [{"atMs": now - 1_000, "text": "key [1] recovered"},
                               {"atMs": now - 5_000, "text": "key [0] cooling for 60 s"}]
    assert by_index(doc)[1]["state"] == "serving"
    clock.advance(10_000)  # a pause that has ended is no pause
    assert document(pool, clock)["pausedUntilMs"] == 0


def test_no_keys_is_an_empty_pool() -> None:
    clock = FakeClock()
    doc = document(pool_of(clock), clock)
    assert doc["keys"] == [] and doc["timeline"] == [] and doc["refused"] == {}


def test_seconds_until_usable() -> None:
    clock = FakeClock()
    now = clock.now_ms()
    pool = pool_of(clock, Account(key=KEYS[0], rate_limit_reset_time=now + 1_500), Account(key=KEYS[1]),
                   Account(key=KEYS[2], disabled_reason="banned"))
    rows = snapshot(pool, Tally(), [], now).keys
    assert [row.seconds_until_usable(now) for row in rows] == [1.5, 0.0, math.inf]


def test_metrics_from_the_same_snapshot() -> None:
    clock = FakeClock()
    now = clock.now_ms()
    reading = QuotaReading(taken_at=now, windows=[QuotaWindow(minutes=300, limit=100, used=25, reset_time=now + 60_000)])
    pool = pool_of(clock, Account(key=KEYS[0], name='Quote "me"\\', quota=reading),
                   Account(key=KEYS[1], rate_limit_reset_time=now + 30_000),
                   Account(key=KEYS[2], disabled_reason="banned"))
    pool.paused_until_ms = now + 4_000
    tally = Tally()
    tally.attempt_ended(KEYS[0], "success")
    tally.attempt_ended(KEYS[0], "success")
    tally.retried(KEYS[1])
    tally.answered_itself("every key is cooling down")
    shot = snapshot(pool, tally, [], now)
    body, content_type = metrics.render(metrics.registry(lambda: shot))
    assert content_type.startswith("text/plain")
    text = body.decode()
    for key in KEYS:
        assert key not in text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value

    def value(name: str, index: int | None = None, **labels: str) -> float:
        if index is not None:
            row = shot.keys[index]
            labels = {"index": str(index), "name": row.name, "masked_key": row.masked_key, **labels}
        return samples[f"kimi_rotator_{name}", tuple(sorted(labels.items()))]

    assert value("key_requests_total", 0, outcome="success") == 2
    assert value("key_retries_total", 1) == 1 and value("key_retries_total", 0) == 0
    assert value("key_health", 0) == 100 and value("key_in_flight", 0) == 0 and value("key_in_flight_cap", 0) == 30
    assert value("key_seconds_until_usable", 0) == 0 and value("key_seconds_until_usable", 1) == 30
    assert value("key_seconds_until_usable", 2) == math.inf
    assert value("key_quota_remaining_ratio", 0, window="5-hour") == 0.75
    assert value("key_quota_reset_seconds", 0, window="5-hour") == 60
    assert value("key_state", 1, state="cooling") == 1 and value("key_state", 0, state="serving") == 1
    states = [labels for name, labels in samples if name == "kimi_rotator_key_state"]
    assert len(states) == 3  # one series per key: its state
    assert value("refused_total", reason="every key is cooling down") == 1
    assert value("paused_seconds") == 4 and value("keys") == 3
    # The name came through the text format's escaping intact.
    assert shot.keys[0].name == 'Quote "me"\\'

    open_metrics, kind = metrics.render(metrics.registry(lambda: shot), "application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text") and open_metrics.rstrip().endswith(b"# EOF")
