"""Persistence under load: how often the accounts file is written while serving flat out.

The addon keeps counts and health in memory and saves them from a background task
every kimi_flush_interval seconds (default 1.0), never per request. Each save replaces
the file (temporary file + rename), so the file's inode changes on every write; a
thread polls ``os.stat`` every 2 ms and counts (inode, mtime, size) changes while wrk
drives the proxy (reverse mode to the fake server, 3 keys) at full speed.

Second part, in process: what one save costs as the pool grows (the worker thread's
read-merge-write of ``FileStore.sync``, and ``KeyPool.adopt``, which runs on the
event loop), after 100 requests' worth of changes.

    python bench/persistence.py [--quick] [--seconds S] [--connections N] [--keys N]
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402

POLL_S = 0.002
FLUSH_INTERVAL_S = 1.0  # the addon's default, set explicitly
EXPECTED_RANGE = (0.7, 1.3)  # writes per second that count as "about one per second"
FLUSH_COST_SIZES = (3, 100, 1_000, 10_000)


class FileWatcher(threading.Thread):
    """Notes the moments the file at ``path`` is replaced or rewritten (bounded by stop())."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.changes: list[float] = []
        self.polls = 0
        self._done = threading.Event()

    def signature(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def run(self) -> None:
        last = self.signature()
        while not self._done.wait(POLL_S):
            self.polls += 1
            sig = self.signature()
            if sig != last:
                self.changes.append(time.monotonic())
                last = sig

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def under_load(seconds: int, connections: int, keys: int) -> None:
    with C.workdir("persistence") as work, C.fake_kimi("--no-record") as (_, fake_port):
        accounts = C.make_accounts_file(work / "kimi-accounts.json", keys)
        script = C.write_wrk_script(work)
        proxy = C.start_proxy(work, "addon", fake_port, addon=True, accounts=accounts,
                              options={"kimi_flush_interval": f"{FLUSH_INTERVAL_S:g}"})
        try:
            C.check_one_request(proxy.url)
            time.sleep(FLUSH_INTERVAL_S * 1.5)  # let the check request's save happen first
            watcher = FileWatcher(accounts)
            watcher.start()
            started = time.monotonic()
            result = C.run_wrk(proxy.url, script, connections, seconds)
            ended = time.monotonic()
            watcher.stop()
        finally:
            proxy.stop()  # SIGINT: the addon's done() saves the last counts
        total, successes = C.read_counts(accounts)

    during = [t for t in watcher.changes if started <= t <= ended]
    window = ended - started
    intervals = [b - a for a, b in zip(during, during[1:])]
    rate = len(during) / window
    print(f"load: wrk {connections} connections for {seconds} s: {result.requests} requests, "
          f"{result.rps:.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, errors {result.errors}")
    print(f"file writes while loading: {len(during)} in {window:.2f} s = {rate:.2f} writes/s "
          f"(flush interval {FLUSH_INTERVAL_S:g} s; {watcher.polls} stat polls, every {POLL_S * 1000:.0f} ms)")
    if intervals:
        print(f"  time between writes: median {C.median(intervals):.3f} s, "
              f"range {min(intervals):.3f}..{max(intervals):.3f} s")
    per_k = len(during) / max(1, result.requests) * 1000
    print(f"  writes per 1,000 requests: {per_k:.2f} (one write per request would be 1,000; "
          f"requests per write: {result.requests / max(1, len(during)):.0f})")
    ok = EXPECTED_RANGE[0] <= rate <= EXPECTED_RANGE[1]
    print(f"expected ≈ 1 write/s ({EXPECTED_RANGE[0]}..{EXPECTED_RANGE[1]}), independent of req/s: {C.verdict(ok)}")
    exact = total >= result.requests + 1 and successes >= result.requests + 1
    print(f"check: the file counts {total} requests, {successes} successful after shutdown; wrk completed "
          f"{result.requests} (+1 check request): {'consistent' if exact else 'MISSING COUNTS'}")


def flush_cost(repeats: int) -> None:
    from rotator.core import policy
    from rotator.core.clock import now_ms
    from rotator.pool.key_pool import KeyPool
    from rotator.store.file import FileStore

    print()
    print("one save, in process (after 100 successful requests spread round-robin over the keys):")
    rows = []
    with C.workdir("flush") as work:
        for keys in FLUSH_COST_SIZES:
            path = C.make_accounts_file(work / f"accounts-{keys}.json", keys, "round-robin")
            store = FileStore(path)
            pool = KeyPool(store.load())
            sync_wall, sync_cpu, adopt_wall = [], [], []
            for _ in range(repeats):
                now = now_ms()
                for _ in range(100):
                    lease = pool.acquire(now)
                    pool.release(lease, policy.classify(200, None, None, now), now)
                taken = pool.take_changes()
                t0, c0 = time.perf_counter(), time.thread_time()
                state = store.sync(taken)
                t1, c1 = time.perf_counter(), time.thread_time()
                assert state is not None
                pool.adopt(state)
                t2 = time.perf_counter()
                sync_wall.append((t1 - t0) * 1000)
                sync_cpu.append((c1 - c0) * 1000)
                adopt_wall.append((t2 - t1) * 1000)
            size_kb = path.stat().st_size / 1024
            rows.append([keys, f"{size_kb:,.0f}", f"{C.median(sync_wall):.2f}", f"{C.median(sync_cpu):.2f}",
                         f"{C.median(adopt_wall):.2f}",
                         f"{(C.median(sync_cpu) + C.median(adopt_wall)) / (FLUSH_INTERVAL_S * 10):.2f}%"])
    C.print_table(["keys", "file KiB", "save ms (thread, wall)", "of which CPU ms", "adopt ms (event loop)",
                   "CPU share of 1 s"], rows)
    print("(the save runs in a worker thread but holds the GIL while it parses, validates and "
          "serialises, so its CPU time is taken from the event loop too; fsync waits are not)")


def main() -> int:
    ap = C.parser(__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, help="seconds of load (default 5; quick 2)")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    ap.add_argument("--keys", type=int, default=3, help="keys in the accounts file under load (default 3)")
    args = ap.parse_args()
    seconds = args.seconds or (2 if args.quick else 5)
    C.print_header("persistence under load: accounts-file writes vs requests",
                   [f"load generator: {C.wrk_version()}, 1 thread, {args.connections} keep-alive connections, "
                    f"{args.keys} keys, --set kimi_flush_interval={FLUSH_INTERVAL_S:g} (the default)"])
    with C.watchdog(90 + seconds):
        under_load(seconds, args.connections, args.keys)
        flush_cost(3 if args.quick else 10)
    if args.quick:
        print("(--quick: short load; the rate is rough)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
