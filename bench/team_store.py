"""Team store: the proxy on a Redis store (kimi_store=redis://...) vs on the accounts file.

Two arms run side by side in one run, each with its own pool, its own fake Kimi process
and three mitmdump proxies (reverse mode, flow_detail=0, 3 keys, health-based, the
addon's defaults but kimi_max_in_flight=256 so no cap ever holds a request back):

- file: the three proxies share one accounts file (the default store);
- redis: the three proxies share one real redis-server (loopback, persistence off),
  filled with the same keys through rotator.admin.ops. Each request takes a team slot on its
  key before it is sent (one EVALSHA round trip, which also carries back the slots this
  proxy's earlier requests gave up): about one script per request, the cost this
  benchmark shows. Saves (counts) go to Redis once a second, as to the file.

Loads: 1 proxy, then 3 proxies loaded at once (one wrk per proxy, in parallel; their
throughputs add), each with 1 client per proxy (latency) and 16 (throughput). Rounds
alternate the arms (file, redis, then redis, file, ...) so the machine's drift hits both;
the ratio redis/file is taken per round and its median reported. Target: the Redis store
keeps at least 0.9 of the file store's throughput.

Checks: no wrk errors (sockets, timeouts, non-2xx); after shutdown each store counts
every request its fake Kimi saw and every answered one as a success (only the few wrk
cuts off as it stops may differ); a last batch of requests through every proxy at once,
after the loads' counts are saved, is counted exactly as the fake saw it; no team slot
is left held in Redis.

    python bench/team_store.py [--quick] [--rounds N] [--seconds S] [--connections N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from bench import _team as T  # noqa: E402

TARGET_RATIO = 0.9
PROXY_COUNTS = (1, 3)
LATENCY_CLIENTS = 1
FLUSH_INTERVAL_S = 1.0  # the addon's default, set explicitly
EXACT_PER_PROXY = 20


def round_line(rnd: int, name: str, load: T.Load) -> str:
    redis = f"{load.per_request(load.redis_cpu_us):4.0f}" if name == T.REDIS else "   -"
    evalsha = f"{load.evalsha / max(1, load.requests):4.2f}" if name == T.REDIS else "   -"
    return (f"  round {rnd + 1} {name:5}: {load.rps:6.0f} req/s  p50 {load.p50_ms:6.2f} ms  "
            f"p99 {load.p99_ms:6.2f} ms  mitmdump {load.per_request(load.proxy_cpu_us):4.0f} CPU µs/req  "
            f"redis {redis} CPU µs/req  EVALSHA/req {evalsha}  errors {load.errors}")


def paired(a: list[float], b: list[float], how: str) -> list[float]:
    return [x / y if how == "ratio" else x - y for x, y in zip(a, b)]


def main() -> int:
    ap = C.parser(__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, help="rounds per arm and load (default 5; quick 1)")
    ap.add_argument("--seconds", type=int, help="seconds per wrk run (default 3; quick 1)")
    ap.add_argument("--connections", type=int, default=16,
                    help="wrk connections per proxy for the throughput load (default 16)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1 if args.quick else 3)
    warmup = 0 if args.quick else 1
    clients = (LATENCY_CLIENTS, args.connections)
    cells = [(proxies, conns) for proxies in PROXY_COUNTS for conns in clients]

    C.print_header("team store: mitmdump -s kimi_rotator_addon.py on Redis vs on the accounts file",
                   [f"load generator: {C.wrk_version()}, 1 thread and keep-alive per proxy, POST {C.MESSAGES_PATH}",
                    f"arms {', '.join(T.ARMS)}: {rounds} round(s) of {seconds} s each, order alternating every round; "
                    f"proxies loaded at once {PROXY_COUNTS}, clients per proxy {clients}",
                    f"every proxy: {T.KEYS} keys, {T.STRATEGY}, --set kimi_max_in_flight={T.MAX_IN_FLIGHT} "
                    f"kimi_flush_interval={FLUSH_INTERVAL_S:g}"])
    budget = 90 + 2 * max(PROXY_COUNTS) * 10 + len(cells) * len(T.ARMS) * (rounds + warmup) * (seconds + 6)
    results: dict[tuple[int, int], dict[str, list[T.Load]]] = {}
    with C.watchdog(budget), C.workdir("team") as work:
        script = C.write_wrk_script(work)
        (work / T.FILE).mkdir()
        (work / T.REDIS).mkdir()
        with T.arm(T.FILE, work / T.FILE, max(PROXY_COUNTS), f"{FLUSH_INTERVAL_S:g}") as file_arm, \
                T.arm(T.REDIS, work / T.REDIS, max(PROXY_COUNTS), f"{FLUSH_INTERVAL_S:g}") as redis_arm:
            arms = {T.FILE: file_arm, T.REDIS: redis_arm}
            for name in T.ARMS:
                print(arms[name].describe())
            for proxies, conns in cells:
                print(f"-- {proxies} prox{'y' if proxies == 1 else 'ies'}, {conns} client(s) each --", flush=True)
                for name in T.ARMS:
                    if warmup:
                        T.load(arms[name], proxies, script, conns, warmup)
                cell = results[(proxies, conns)] = {name: [] for name in T.ARMS}
                for rnd in range(rounds):
                    order = T.ARMS if rnd % 2 == 0 else T.ARMS[::-1]
                    for name in order:
                        done = T.load(arms[name], proxies, script, conns, seconds)
                        cell[name].append(done)
                        print(round_line(rnd, name, done), flush=True)
            # An exact count: once the loads' counts are saved, EXACT_PER_PROXY requests through
            # every proxy at once, all answered; then the proxies stop (done(): the last save).
            before = {name: T.settled_counts(arms[name], FLUSH_INTERVAL_S) for name in T.ARMS}
            seen_before = {name: T.upstream_seen(arms[name]) for name in T.ARMS}
            for name in T.ARMS:
                T.send_all(arms[name], EXACT_PER_PROXY)
            counts: dict[str, tuple[tuple[int, int], int]] = {}
            for name in T.ARMS:
                arms[name].stop_proxies()  # done(): the last save, slots given back
                counts[name] = (T.store_counts(arms[name]), T.upstream_seen(arms[name]))
            slots_left = T.slots_left(redis_arm)
            unused_file_made = redis_arm.accounts is not None and redis_arm.accounts.exists()

    print()
    print("Summary (medians over rounds; with several proxies: req/s summed, p50 the median of "
          "their p50s, p99 the worst of their p99s, CPU summed)")
    rows = []
    errors = 0
    for (proxies, conns), cell in results.items():
        for name in T.ARMS:
            loads = cell[name]
            errors += sum(x.errors for x in loads)
            redis = name == T.REDIS
            rows.append([proxies, conns, name, f"{C.median([x.rps for x in loads]):.0f}",
                         " ".join(f"{x.rps:.0f}" for x in loads),
                         f"{C.median([x.p50_ms for x in loads]):.2f}", f"{C.median([x.p99_ms for x in loads]):.2f}",
                         f"{C.median([x.per_request(x.proxy_cpu_us) for x in loads]):.0f}",
                         f"{C.median([x.per_request(x.redis_cpu_us) for x in loads]):.0f}" if redis else "-",
                         f"{C.median([x.evalsha / max(1, x.requests) for x in loads]):.2f}" if redis else "-"])
    C.print_table(["proxies", "clients each", "arm", "req/s", "per round", "p50 ms", "p99 ms",
                   "mitmdump CPU µs/req", "redis CPU µs/req", "EVALSHA/req"], rows)
    print()
    print("Redis vs file, paired round by round (median, with the per-round range):")
    met = []
    for (proxies, conns), cell in results.items():
        f, r = cell[T.FILE], cell[T.REDIS]
        tput = paired([x.rps for x in r], [x.rps for x in f], "ratio")
        p50 = paired([x.p50_ms for x in r], [x.p50_ms for x in f], "difference")
        p99 = paired([x.p99_ms for x in r], [x.p99_ms for x in f], "difference")
        ratio = C.median(tput)
        ok = ratio >= TARGET_RATIO
        if conns != LATENCY_CLIENTS:
            met.append(ok)
        print(f"  {proxies} prox{'y  ' if proxies == 1 else 'ies'}, {conns:2} client(s) each: throughput "
              f"{ratio:.3f} (per round {C.spread(tput)}): target ≥ {TARGET_RATIO}: {C.verdict(ok)}; "
              f"added latency p50 {C.median(p50):+.3f} ms, p99 {C.median(p99):+.3f} ms")
    print(f"overall (throughput at {args.connections} clients per proxy, {' and '.join(map(str, PROXY_COUNTS))} "
          f"proxies, redis/file ≥ {TARGET_RATIO}): {C.verdict(all(met))}")
    print()
    bad = 0
    for name in T.ARMS:
        (total, successes), seen = counts[name]
        done, cut = arms[name].completed, arms[name].cut
        # Every request the fake saw was counted (the pool counts it before sending), every
        # answered one as a success; only those wrk cut off when it stopped may differ: their
        # client left (counted, no success), some before the fake read them.
        ok = seen <= total <= seen + cut and done <= successes <= total and total - successes <= cut
        bad += not ok
        print(f"check: {name} arm, whole run: the store counts {total} requests ({successes} successful) after "
              f"shutdown; its fake Kimi saw {seen}, clients got {done} answers, wrk's stops cut off at most {cut}: "
              f"{'consistent' if ok else 'MISSING COUNTS'}")
        sent = EXACT_PER_PROXY * len(arms[name].proxies)
        got = (total - before[name][0], successes - before[name][1], seen - seen_before[name])
        exact = got == (sent, sent, sent)
        bad += not exact
        print(f"check: {name} arm, last {sent} requests ({EXACT_PER_PROXY} through each proxy at once, then "
              f"shutdown): the store counted {got[0]} ({got[1]} successful), its fake Kimi saw {got[2]}: "
              f"{'exact' if exact else 'MISMATCH'}")
        clean_exit = all(status == 0 for status in arms[name].exits)
        bad += not clean_exit
        print(f"check: {name} arm, shutdown: the proxies exited with status "
              f"{', '.join(map(str, arms[name].exits))}: {'clean' if clean_exit else 'NOT CLEAN'}")
    print(f"check: redis arm: team slots still held after shutdown: {slots_left}; "
          f"its unused accounts file {'WAS WRITTEN' if unused_file_made else 'stays absent'}")
    bad += bool(slots_left) + unused_file_made
    if errors:
        print(f"WARNING: {errors} wrk errors (socket errors, timeouts or non-2xx answers): figures suspect")
    if bad:
        print(f"WARNING: {bad} check(s) failed: figures suspect. How each proxy stopped:")
        for name in T.ARMS:
            print(arms[name].shutdown_report())
    if args.quick:
        print("(--quick: one short round; the figures are rough, use the full run for numbers)")
    return 1 if errors or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
