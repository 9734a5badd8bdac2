"""Status page cost: building /status.json and /metrics, in process, no network.

The proxy answers the status page on its own event loop, so what one answer costs is
time no request is served. For 3, 100 and 1,000 keys, each key with what a busy pool
holds (100 response times, a quota reading of two windows, this process's outcomes and
retries; every 10th key cooling, every 50th disabled, a few requests in flight) and a
full timeline (50 events), one render is timed with time.perf_counter_ns:

  snapshot       rotator.status.document.snapshot: every key's row, read on the event loop
  status.json    document.status_json of a snapshot: the body (written in a worker thread)
  metrics        metrics.render_snapshot of a snapshot: the Prometheus text (in a thread)
  answer ...     StatusPage.answer for a parsed request, awaited: the access check, the
                 snapshot, the body in a worker thread (asyncio.to_thread), the headers

Printed: median / p90 µs per render, the bodies' sizes, µs per key at 1,000 keys, and
the share of one core an open page (one status.json a second) and a Prometheus scrape
every 15 s take at 1,000 keys. Every body is checked for full keys.

    python bench/status_cost.py [--quick]
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from rotator.conversations.pins import PinTable  # noqa: E402
from rotator.core.clock import SYSTEM_CLOCK, now_ms  # noqa: E402
from rotator.core.models import Account, AccountsFile  # noqa: E402
from rotator.core.quota import QuotaReading, QuotaWindow  # noqa: E402
from rotator.pool.key_pool import KeyPool  # noqa: E402
from rotator.proxy.options import Settings  # noqa: E402
from rotator.proxy.status_page import StatusPage  # noqa: E402
from rotator.status import document, http_server, metrics  # noqa: E402
from rotator.status.tally import Tally  # noqa: E402
from rotator.status.timeline import Event, Timeline  # noqa: E402

SIZES = (3, 100, 1_000)
VERDICTS = ("success", "rate_limited", "upstream_fault")
PAGE_FETCHES_PER_S = 1.0  # the page's own refresh
SCRAPES_PER_S = 1 / 15  # Prometheus' default scrape interval


def busy_pool(keys: int, now: int) -> tuple[KeyPool, Tally, Timeline]:
    accounts = []
    for i in range(keys):
        reading = QuotaReading(
            taken_at=now - 60_000,
            windows=[QuotaWindow(minutes=300, limit=200, used=i % 200, reset_time=now + 3_600_000),
                     QuotaWindow(minutes=7 * 24 * 60, limit=2048, used=(7 * i) % 2048, reset_time=now + 86_400_000)],
            parallel_limit=30,
        )
        accounts.append(Account(
            key=C.bench_key(i), name=f"Key number {i}", total_requests=1_000 + i, successful_requests=990 + i,
            response_times=[200 + (i * 37 + j * 101) % 1_800 for j in range(100)], quota=reading,
            rate_limit_reset_time=now + 600_000 if i % 10 == 3 else 0,
            cooldown_reason="rate limited (429)" if i % 10 == 3 else None,
            disabled_reason="key rejected as invalid" if i % 50 == 7 else None,
        ))
    pool = KeyPool(AccountsFile(accounts=accounts, rotation_strategy="health-based"))
    tally = Tally()
    for i in range(keys):
        key = C.bench_key(i)
        for n, verdict in enumerate(VERDICTS):
            tally.outcomes[key, verdict] = 100 + i + n
        tally.retries[key] = i % 5
        if i % 4 == 0:
            pool.in_flight[key] = 1 + i % 3
    tally.answered_itself("every key is cooling down")
    timeline = Timeline()
    for n in range(50):
        timeline.events.append(Event(now - n * 1_000, f"key [{n}] Key number {n} (sk-ben…{n:04d}) cooling for 60 s"))
    return pool, tally, timeline


def time_renders(render: Callable[[], object], iterations: int, max_s: float, warmup: int) -> list[float]:
    for _ in range(warmup):
        render()
    times: list[float] = []
    stop = time.perf_counter() + max_s
    while len(times) < iterations and (len(times) < 5 or time.perf_counter() < stop):
        started = time.perf_counter_ns()
        render()
        times.append((time.perf_counter_ns() - started) / 1_000)
    return times


def request(path: str) -> http_server.Request:
    made = http_server.parse_head(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8766\r\n\r\n".encode(),
                                  ("127.0.0.1", 50000))
    assert made is not None
    return made


def main() -> int:
    ap = C.parser(__doc__.split("\n")[0])
    args = ap.parse_args()
    iterations, max_s, warmup = (10, 0.5, 1) if args.quick else (300, 3.0, 5)
    C.print_header("status page cost (in process, no network)",
                   [f"per cell: up to {iterations} renders or {max_s:g} s (at least 5) after {warmup} warm-up; gc on",
                    "each key: 100 response times, 2 quota windows, 3 outcomes; 1 in 10 cooling, 1 in 50 disabled"])
    rows, per_size, leaks = [], {}, []
    with C.watchdog(120 if args.quick else 900):
        for keys in SIZES:
            now = now_ms()
            pool, tally, timeline = busy_pool(keys, now)
            rotator = SimpleNamespace(pool=pool, tally=tally, timeline=timeline, clock=SYSTEM_CLOCK,
                                      settings=Settings(), sync=None, pins=PinTable())
            page = StatusPage(rotator)
            events = timeline.newest_first()
            json_request, metrics_request = request("/status.json"), request("/metrics")
            shot = page.snapshot()
            loop = asyncio.new_event_loop()

            def answer(made: http_server.Request) -> http_server.Response:
                return loop.run_until_complete(page.answer(made))

            arms: dict[str, Callable[[], object]] = {
                "snapshot": lambda: document.snapshot(pool, tally, events, now_ms()),
                "status.json": lambda: document.status_json(shot),
                "metrics": lambda: metrics.render_snapshot(shot)[0],
                "answer status.json": lambda: answer(json_request),
                "answer metrics": lambda: answer(metrics_request),
            }
            figures = {}
            for name, render in arms.items():
                gc.collect()
                figures[name] = time_renders(render, iterations, max_s, warmup)
            bodies = {"status.json": answer(json_request).body, "metrics": answer(metrics_request).body}
            loop.close()
            for path, body in bodies.items():
                if any(C.bench_key(i).encode() in body for i in range(keys)):
                    leaks.append(f"{path} at {keys} keys")
            per_size[keys] = figures
            rows.append([f"{keys:,}", *(f"{C.median(t):,.0f} / {C.percentile(t, 90):,.0f}" for t in figures.values()),
                         f"{len(bodies['status.json']) / 1024:,.1f}", f"{len(bodies['metrics']) / 1024:,.1f}"])

    print("median / p90 in µs per render")
    C.print_table(["keys", *arms, "status.json KB", "metrics KB"], rows)
    print()
    at_1k = {name: C.median(t) for name, t in per_size[1_000].items()}
    page_us, scrape_us = at_1k["answer status.json"], at_1k["answer metrics"]
    share = (page_us * PAGE_FETCHES_PER_S + scrape_us * SCRAPES_PER_S) / 1e6 * 100
    print(f"at 1,000 keys: status.json {page_us:,.0f} µs ({page_us / 1_000:.1f} µs per key), "
          f"metrics {scrape_us:,.0f} µs ({scrape_us / 1_000:.1f} µs per key)")
    print(f"on the event loop per answer at 1,000 keys: the snapshot, {at_1k['snapshot']:,.0f} µs; "
          "the body is written in a worker thread")
    print(f"an open page (1 status.json/s) and a scrape every 15 s at 1,000 keys: {share:.2f}% of one core")
    print(f"check: no full key in any body at any size: {'ok' if not leaks else 'FULL KEY IN ' + ', '.join(leaks)}")
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main())
