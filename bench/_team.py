"""The two stores of bench/team_store.py as arms: their pools, proxies, loads and counts.

An arm is a pool (the accounts file, or a real redis-server with the same keys put in
through `rotator.admin.ops`), its own fake Kimi process (so the requests it saw belong to that
arm alone) and up to three mitmdump proxies on that pool. A load is one wrk per proxy,
all started at once; their throughputs add. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import _common as C
from rotator.core.text import clean_line
from testbed import processes
from testbed.redis_server import RedisServer

FILE, REDIS = "file", "redis"
ARMS = (FILE, REDIS)
KEYS = 3
STRATEGY = "health-based"  # the default
# Per key and (on Redis) for the whole team: well above every connection the benchmark
# opens (3 proxies x 16), so the cap never holds a request back and every request pays
# the team slot's two round trips and nothing else.
MAX_IN_FLIGHT = 256


@dataclass
class Load:
    """One load of an arm: a wrk per proxy, run in parallel, plus what the processes used."""

    runs: list[C.WrkResult]
    proxy_cpu_us: float  # all loaded mitmdumps' CPU time, µs
    redis_cpu_us: float  # redis-server's CPU time, µs (0 for the file arm)
    evalsha: int  # EVALSHA calls the server ran during the load (0 for the file arm)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def rps(self) -> float:
        return sum(r.rps for r in self.runs)

    @property
    def p50_ms(self) -> float:
        """The median of the proxies' medians."""
        return C.median([r.p50_ms for r in self.runs])

    @property
    def p99_ms(self) -> float:
        """The worst of the proxies' p99s."""
        return max(r.p99_ms for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    def per_request(self, micros: float) -> float:
        return micros / max(1, self.requests)


@dataclass
class Arm:
    """A store, its fake Kimi and its proxies, running until `arm` exits."""

    name: str
    proxies: list[processes.Proxy]
    fake_port: int
    redis: RedisServer | None = None
    accounts: Path | None = None  # the file arm's accounts file; the redis arm's must stay absent
    completed: int = 0  # requests answered to a client: wrk's (warm-ups too) and the checks
    cut: int = 0  # requests wrk may have left in flight when it stopped: its connections, per run
    probes: int = 0  # requests sent straight to the fake by `upstream_seen`
    exits: list[int | None] = field(default_factory=list)  # each proxy's exit status, once stopped

    def stop_proxies(self) -> None:
        """SIGINT each proxy: its done() hook saves its last counts and gives its slots back.
        A proxy that has not exited 30 s later is killed (its status then says so)."""
        if not self.exits:
            self.exits = [proxy.stop(timeout=30.0, must_exit=False) for proxy in self.proxies]

    def shutdown_report(self) -> str:
        """Each proxy's exit status and its last lines: why a last save may be missing."""
        parts = []
        for i, (proxy, status) in enumerate(zip(self.proxies, self.exits)):
            tail = "\n".join("      " + clean_line(line, 300) for line in proxy.output().splitlines()[-12:])
            parts.append(f"    {self.name}-{i}: exit status {status}\n{tail}")
        return "\n".join(parts)

    def describe(self) -> str:
        if self.redis is None:
            return f"{self.name}: one accounts file for every proxy, --set kimi_accounts={self.accounts.name}"
        return (f"{self.name}: --set kimi_store=redis://127.0.0.1:{self.redis.port}/0 for every proxy "
                f"(redis-server {redis_version(self.redis)}, persistence off)")


def redis_version(server: RedisServer) -> str:
    info = server.command("INFO", "server")
    return str(info.get("redis_version", "?")) if isinstance(info, dict) else "?"


def evalsha_calls(server: RedisServer | None) -> int:
    if server is None:
        return 0
    stats = server.command("INFO", "commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) if isinstance(stats, dict) else 0


def fill_redis(url: str) -> None:
    """The file arm's keys and strategy, put in the team store the way the CLI does."""
    from rotator.admin import ops
    from rotator.core.clock import now_ms
    from rotator.store.redis_store import RedisStore

    store = RedisStore(url)
    try:
        for i in range(KEYS):
            ops.run(store, ops.add_key(C.bench_key(i), f"bench-{i}", now_ms()))
        ops.run(store, ops.set_strategy(STRATEGY, now_ms()))
    finally:
        store.close()


@contextmanager
def arm(name: str, work: Path, proxies: int, flush_interval: str) -> Iterator[Arm]:
    """Start an arm: its store, its fake Kimi, `proxies` mitmdumps (stopped on exit)."""
    options: dict[str, object] = {"kimi_max_in_flight": MAX_IN_FLIGHT, "kimi_flush_interval": flush_interval}
    with ExitStack() as stack:
        _, fake_port = stack.enter_context(C.fake_kimi("--no-record"))
        redis: RedisServer | None = None
        if name == FILE:
            accounts = C.make_accounts_file(work / "kimi-accounts.json", KEYS, STRATEGY)
        else:
            (work / "redis").mkdir()
            redis = RedisServer(work / "redis")
            redis.start()
            stack.callback(redis.stop)
            fill_redis(redis.url)
            # kimi_store takes the place of the file: this path must stay absent.
            accounts = work / "unused-accounts.json"
            options["kimi_store"] = redis.url
        made = Arm(name, [], fake_port, redis, accounts)
        stack.callback(made.stop_proxies)
        for i in range(proxies):
            made.proxies.append(C.start_proxy(work, f"{name}-{i}", fake_port, addon=True,
                                              accounts=accounts, options=options))
        for proxy in made.proxies:
            C.check_one_request(proxy.url)
            made.completed += 1
        yield made


def load(a: Arm, proxies: int, script: Path, connections: int, seconds: int) -> Load:
    """One wrk per proxy (the first `proxies` of the arm), all at once."""
    loaded = a.proxies[:proxies]
    cpu_before = [C.process_cpu_ns(p.process.pid) for p in loaded]
    redis_pid = a.redis.proc.pid if a.redis is not None and a.redis.proc is not None else None
    redis_before = C.process_cpu_ns(redis_pid) if redis_pid else 0
    evalsha_before = evalsha_calls(a.redis)
    with ThreadPoolExecutor(len(loaded)) as pool:
        runs = list(pool.map(lambda p: C.run_wrk(p.url, script, connections, seconds), loaded))
    cpu_after = [C.process_cpu_ns(p.process.pid) for p in loaded]
    redis_after = C.process_cpu_ns(redis_pid) if redis_pid else 0
    a.completed += sum(r.requests for r in runs)
    a.cut += connections * len(loaded)
    return Load(runs, sum(b - a for a, b in zip(cpu_before, cpu_after)) / 1000,
                (redis_after - redis_before) / 1000, evalsha_calls(a.redis) - evalsha_before)


def upstream_seen(a: Arm) -> int:
    """How many requests the arm's fake Kimi got through its proxies so far: one more
    request, straight to it, is numbered by its `x-fake-kimi-request` header (1-based,
    every request counted); the earlier such probes are taken off."""
    conn = http.client.HTTPConnection("127.0.0.1", a.fake_port, timeout=10)
    try:
        conn.request("POST", C.MESSAGES_PATH, json.dumps(C.REQUEST_BODY),
                     {"content-type": "application/json", "x-api-key": C.PLACEHOLDER_KEY})
        answer = conn.getresponse()
        answer.read()
        number = answer.getheader("x-fake-kimi-request")
    finally:
        conn.close()
    if answer.status != 200 or number is None:
        raise SystemExit(f"bench: the {a.name} arm's fake Kimi answered {answer.status} without a number")
    seen = int(number) - 1 - a.probes
    a.probes += 1
    return seen


def store_counts(a: Arm) -> tuple[int, int]:
    """(total, successful) requests the arm's store holds, summed over its keys."""
    if a.redis is None:
        return C.read_counts(a.accounts)
    from rotator.store.redis_store import RedisStore

    store = RedisStore(a.redis.url)
    try:
        accounts = store.read().accounts
    finally:
        store.close()
    return sum(x.total_requests for x in accounts), sum(x.successful_requests for x in accounts)


def slots_left(a: Arm) -> int:
    """Team slots still held on the arm's Redis (every one must be given back)."""
    if a.redis is None:
        return 0
    from rotator.store.urls import DEFAULT_PREFIX, slots_key

    return sum(int(a.redis.command("ZCARD", slots_key(DEFAULT_PREFIX, C.bench_key(i)))) for i in range(KEYS))


def settled_counts(a: Arm, flush_interval_s: float, timeout_s: float = 15.0) -> tuple[int, int]:
    """The store's counts once they stopped changing for longer than a save interval."""
    deadline = time.monotonic() + timeout_s
    last = store_counts(a)
    while time.monotonic() < deadline:
        time.sleep(flush_interval_s * 1.5)
        now = store_counts(a)
        if now == last:
            return now
        last = now
    raise SystemExit(f"bench: the {a.name} arm's counts still changed after {timeout_s:.0f} s")


def send_all(a: Arm, per_proxy: int) -> None:
    """`per_proxy` requests through each proxy (3 at a time per proxy), each answered 200."""
    urls = [p.url for p in a.proxies for _ in range(per_proxy)]
    with ThreadPoolExecutor(3 * len(a.proxies)) as pool:
        list(pool.map(C.check_one_request, urls))
    a.completed += len(urls)
