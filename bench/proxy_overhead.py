"""Proxy overhead: bare mitmdump vs mitmdump with the kimi-rotator addon.

Both proxies run in reverse mode in front of the same fake Kimi server process (one
process for the whole run), both with flow_detail=0. The addon arm has an accounts file
of 3 keys and kimi_hosts=127.0.0.1, so every request gets a pool key. wrk (one thread,
keep-alive) POSTs small Messages requests; the answers are small JSON bodies.

Rounds alternate (bare, addon, then addon, bare, ...) so that drift in the machine's
load hits both arms alike; each figure is compared only within this run. Besides wrk's
throughput and latency, the mitmdump process's own CPU time per request is reported
(from /proc/PID/task/*/schedstat): on a shared machine that is steadier than req/s.

--passthrough adds a third arm: the addon loaded but kimi_hosts left at api.kimi.com,
so its hooks run and return at once (requests to 127.0.0.1 are not Kimi requests).
It splits the addon's cost into mitmproxy calling the addon at all and the key work.

--visibility adds an arm with what a person watching uses: the status page on (a
thread fetches /status.json every second, as the open page does, and /metrics every
second, as a scraper might) and quota polling every 10 s (the fake answers /usages).
Its throughput should match the addon arm's within noise.

    python bench/proxy_overhead.py [--quick] [--rounds N] [--seconds S] [--passthrough] [--visibility]
"""

from __future__ import annotations

import re
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402

TARGET_RATIO = 0.95  # the bar; the floor aimed at is ~0.985, what the passthrough arm keeps
CONCURRENCIES = (1, 16)


@dataclass
class Arm:
    runs: list[C.WrkResult] = field(default_factory=list)
    cpu_us_per_req: list[float] = field(default_factory=list)

    def rps(self) -> list[float]:
        return [r.rps for r in self.runs]


def measure(proxy, script: Path, connections: int, seconds: int, arm: Arm) -> C.WrkResult:
    pid = proxy.process.pid
    cpu_before = C.process_cpu_ns(pid)
    result = C.run_wrk(proxy.url, script, connections, seconds)
    cpu_after = C.process_cpu_ns(pid)
    arm.runs.append(result)
    arm.cpu_us_per_req.append((cpu_after - cpu_before) / 1000 / max(1, result.requests))
    return result


@contextmanager
def page_watcher(proxy) -> Iterator[list[int]]:
    """Fetch the proxy's /status.json and /metrics once a second while in the block, as an
    open status page and a Prometheus scrape would; yields the list of fetches made."""
    found = re.search(r"status page at (http://127\.0\.0\.1:\d+)/", proxy.output())
    if found is None:
        raise RuntimeError("the visibility arm's proxy logged no status page URL:\n" + proxy.output())
    base = found.group(1)
    fetched: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while True:
            for path in ("/status.json", "/metrics"):
                with urllib.request.urlopen(base + path, timeout=5) as answer:
                    answer.read()
                    fetched.append(answer.status)
            if stop.wait(1.0):
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield fetched
    finally:
        stop.set()
        thread.join(10)


def paired(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]


def main() -> int:
    ap = C.parser(__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, help="rounds per arm and concurrency (default 5; quick 1)")
    ap.add_argument("--seconds", type=int, help="seconds per wrk run (default 3; quick 1)")
    ap.add_argument("--passthrough", action="store_true",
                    help="add an arm with the addon loaded but no request for a Kimi host")
    ap.add_argument("--visibility", action="store_true",
                    help="add an arm with the status page watched every second and quota polling on")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1 if args.quick else 3)
    warmup = 0 if args.quick else 1
    arm_names = (["bare", "addon"] + (["passthrough"] if args.passthrough else [])
                 + (["visibility"] if args.visibility else []))

    C.print_header("proxy overhead: bare mitmdump vs mitmdump -s kimi_rotator_addon.py",
                   [f"load generator: {C.wrk_version()}, 1 thread, keep-alive, POST {C.MESSAGES_PATH}",
                    f"arms {', '.join(arm_names)}: {rounds} round(s) of {seconds} s each, order rotating "
                    f"every round; clients {CONCURRENCIES}"])
    budget = 60 + len(CONCURRENCIES) * (len(arm_names) * (rounds + warmup) + 1) * (seconds + 5)
    addon_requests = 0
    page_fetches: list[int] = []
    with C.watchdog(budget), C.workdir("overhead") as work, C.fake_kimi("--no-record") as (_, fake_port):
        accounts = C.make_accounts_file(work / "kimi-accounts.json", 3)
        script = C.write_wrk_script(work)
        proxies = {}
        try:
            proxies["bare"] = C.start_proxy(work, "bare", fake_port, addon=False)
            proxies["addon"] = C.start_proxy(work, "addon", fake_port, addon=True, accounts=accounts)
            if args.passthrough:
                proxies["passthrough"] = C.start_proxy(
                    work, "passthrough", fake_port, addon=True,
                    accounts=C.make_accounts_file(work / "passthrough-accounts.json", 3),
                    options={"kimi_hosts": "api.kimi.com"})
            if args.visibility:
                proxies["visibility"] = C.start_proxy(
                    work, "visibility", fake_port, addon=True,
                    accounts=C.make_accounts_file(work / "visibility-accounts.json", 3),
                    options={"kimi_status": "127.0.0.1:0", "kimi_usage_interval": 10})
            for name in arm_names:
                C.check_one_request(proxies[name].url)
            addon_requests += 1
            results: dict[int, dict[str, Arm]] = {}
            direct: dict[int, C.WrkResult] = {}
            for conc in CONCURRENCIES:
                print(f"-- {conc} client(s) --", flush=True)
                direct[conc] = C.run_wrk(f"http://127.0.0.1:{fake_port}", script, conc, seconds)
                print(f"  fake server alone (no proxy): {direct[conc].rps:8.0f} req/s", flush=True)
                for name in arm_names:
                    if warmup:
                        r = C.run_wrk(proxies[name].url, script, conc, warmup)
                        if name == "addon":
                            addon_requests += r.requests
                arms = results[conc] = {name: Arm() for name in arm_names}
                for rnd in range(rounds):
                    shift = rnd % len(arm_names)
                    for name in arm_names[shift:] + arm_names[:shift]:
                        if name == "visibility":
                            with page_watcher(proxies[name]) as fetched:
                                r = measure(proxies[name], script, conc, seconds, arms[name])
                            page_fetches.extend(fetched)
                        else:
                            r = measure(proxies[name], script, conc, seconds, arms[name])
                        if name == "addon":
                            addon_requests += r.requests
                        print(f"  round {rnd + 1} {name:11}: {r.rps:6.0f} req/s  p50 {r.p50_ms:6.2f} ms"
                              f"  p99 {r.p99_ms:6.2f} ms  mitmdump {arms[name].cpu_us_per_req[-1]:5.0f} "
                              f"CPU µs/req  errors {r.errors}", flush=True)
        finally:
            for proxy in proxies.values():
                proxy.stop()
        file_requests, file_successes = C.read_counts(accounts)

    print()
    print("Summary (medians over rounds)")
    rows = []
    errors = 0
    for conc in CONCURRENCIES:
        for name in arm_names:
            a = results[conc][name]
            errors += sum(r.errors for r in a.runs)
            rows.append([conc, name, f"{C.median(a.rps()):.0f}", " ".join(f"{x:.0f}" for x in a.rps()),
                         f"{C.median([r.p50_ms for r in a.runs]):.2f}",
                         f"{C.median([r.p99_ms for r in a.runs]):.2f}",
                         f"{C.median(a.cpu_us_per_req):.0f}",
                         " ".join(f"{x:.0f}" for x in a.cpu_us_per_req),
                         f"{C.median([r.client_cpu_s / r.seconds * 100 for r in a.runs]):.0f}%"])
        d = direct[conc]
        rows.append([conc, "fake alone", f"{d.rps:.0f}", "(reference, 1 run)", f"{d.p50_ms:.2f}",
                     f"{d.p99_ms:.2f}", "-", "-", f"{d.client_cpu_s / d.seconds * 100:.0f}%"])
    C.print_table(["clients", "arm", "req/s", "per round", "p50 ms", "p99 ms",
                   "mitmdump CPU µs/req", "per round", "wrk CPU"], rows)
    print()
    print("Ratios to bare, paired round by round (median, with the per-round range):")
    for conc in CONCURRENCIES:
        bare = results[conc]["bare"]
        cpu_b = C.median(bare.cpu_us_per_req)
        print(f"{conc:2} client(s):")
        for name in arm_names[1:]:
            a = results[conc][name]
            tput = paired(a.rps(), bare.rps())
            cpu = paired(a.cpu_us_per_req, bare.cpu_us_per_req)
            p50 = paired([r.p50_ms for r in a.runs], [r.p50_ms for r in bare.runs])
            ratio, cpu_ratio = C.median(tput), C.median(cpu)
            print(f"   {name}: throughput {ratio:.3f} (per round {C.spread(tput)}): target ≥ {TARGET_RATIO}: "
                  f"{C.verdict(ratio >= TARGET_RATIO)}; p50 latency {C.median(p50):.3f}")
            print(f"   {' ' * len(name)}  mitmdump CPU per request {cpu_ratio:.3f} (per round {C.spread(cpu)}), "
                  f"{C.median(a.cpu_us_per_req) - cpu_b:+.0f} µs: throughput a CPU-bound mitmdump keeps = "
                  f"{1 / cpu_ratio:.3f} of bare: {C.verdict(1 / cpu_ratio >= TARGET_RATIO)}")
    print()
    print(f"check: the addon arm counted {file_requests} requests ({file_successes} successful) in its "
          f"accounts file; wrk completed {addon_requests} through it (the file may count one more "
          f"per connection per run: requests in flight when wrk stopped)")
    if args.visibility:
        bad = [status for status in page_fetches if status != 200]
        print(f"check: the visibility arm's page was fetched {len(page_fetches)} times "
              f"(/status.json and /metrics), {len(bad)} not 200")
        errors += len(bad)
    if errors:
        print(f"WARNING: {errors} wrk errors (socket errors, timeouts or non-2xx answers): figures suspect")
    if args.quick:
        print("(--quick: one short round; the figures are rough, use the full run for numbers)")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
