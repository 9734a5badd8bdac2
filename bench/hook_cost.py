"""Hook cost vs pool size: the addon's own per-request work, in process, no network.

One iteration is what the addon does for one successful request, in its order:
``pool.acquire`` (choose a key) and ``replace_client_key`` (request hook),
``mask_sent_key`` (responseheaders hook),
``policy.classify`` and ``pool.release`` (response hook), with the three ``now_ms()``
calls the hooks make. Each iteration is timed on its own with time.perf_counter_ns;
the request headers it rewrites are made fresh, untimed, before it.

Scenarios (every strategy, 3 / 100 / 1,000 / 10,000 keys):
  ready                every key usable and healthy (the usual case)
  active cooling       the active key is cooling, and stays the active one for every
                       iteration (re-pinned, untimed): health-based must score every key
  all but one cooling  only the last key is usable, active pinned to the first: every
                       strategy walks the whole pool

    python bench/hook_cost.py [--quick] [--profile STRATEGY,SCENARIO,KEYS]
"""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from mitmproxy.http import Headers  # noqa: E402
from rotator.core import policy  # noqa: E402
from rotator.core.clock import now_ms  # noqa: E402
from rotator.core.models import Account, AccountsFile  # noqa: E402
from rotator.pool.key_pool import KeyPool  # noqa: E402
from rotator.pool.lease import Lease
from rotator.proxy.headers import mask_sent_key, replace_client_key  # noqa: E402

STRATEGIES = ("round-robin", "health-based", "sticky")
SCENARIOS = ("ready", "active cooling", "all but one cooling")
SIZES = (3, 100, 1_000, 10_000)
# The TypeScript plugin's measured cost per request (ms), by number of keys.
TYPESCRIPT_MS = {3: 6.0, 100: 9.0, 1_000: 40.0}
TARGET_US = {100: 10.0, 1_000: 40.0}
FLUSH_EVERY = 1_000  # iterations between (untimed) take_changes, like the 1 s flush

# What an Anthropic-SDK client (Claude Code) sends: header handling costs grow with
# the number of headers, so the set is a realistic one.
REQUEST_HEADERS = Headers([(name.encode(), value.encode()) for name, value in (
    ("host", "api.kimi.com"), ("connection", "keep-alive"), ("accept", "application/json"),
    ("x-stainless-retry-count", "0"), ("x-stainless-timeout", "600"), ("x-stainless-lang", "js"),
    ("x-stainless-package-version", "0.55.1"), ("x-stainless-os", "Linux"), ("x-stainless-arch", "x64"),
    ("x-stainless-runtime", "node"), ("x-stainless-runtime-version", "v22.15.0"),
    ("anthropic-dangerous-direct-browser-access", "true"), ("anthropic-version", "2023-06-01"),
    ("x-api-key", C.PLACEHOLDER_KEY), ("x-app", "cli"), ("user-agent", "claude-cli/1.0.83 (external, cli)"),
    ("content-type", "application/json"),
    ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14"),
    ("accept-language", "*"), ("sec-fetch-mode", "cors"), ("accept-encoding", "gzip, deflate"),
    ("content-length", "1234"),
)])
RESPONSE_HEADERS = Headers([
    (b"content-type", b"application/json"), (b"content-length", b"300"),
    (b"anthropic-ratelimit-requests-remaining", b"99"),
])
RESPONSE_BODY = b'{"id":"msg_1","type":"message","content":[{"type":"text","text":"hi"}]}'


@dataclass
class Cell:
    strategy: str
    scenario: str
    keys: int
    samples_ns: list[int]

    @property
    def median_us(self) -> float:
        return C.median(self.samples_ns) / 1000

    @property
    def p99_us(self) -> float:
        return C.percentile(self.samples_ns, 99) / 1000


def make_pool(strategy: str, keys: int, scenario: str) -> tuple[KeyPool, int | None]:
    """A pool in the scenario's state, and the active index to pin (None: don't)."""
    state = AccountsFile(
        accounts=[Account(key=C.bench_key(i), name=f"bench-{i}") for i in range(keys)],
        rotation_strategy=strategy,
    )
    far = now_ms() + 3_600_000
    if scenario == "ready":
        return KeyPool(state), None
    if scenario == "active cooling":
        state.accounts[0].rate_limit_reset_time = far
        return KeyPool(state), 0
    for account in state.accounts[:-1]:
        account.rate_limit_reset_time = far
    return KeyPool(state), 0


def run_cell(strategy: str, scenario: str, keys: int, max_iters: int, max_s: float,
             warmup: int) -> Cell:
    pool, pin = make_pool(strategy, keys, scenario)
    state = pool.state
    samples: list[int] = []
    clock = time.perf_counter_ns
    warm_until = clock() + int(max_s * 0.2e9)
    stop_at = None
    i = 0
    while True:
        if pin is not None:
            state.active_index = pin
        if i % FLUSH_EVERY == 0:
            pool.take_changes()
        headers = REQUEST_HEADERS.copy()
        t0 = clock()
        lease = pool.acquire(now_ms())
        placement = replace_client_key(headers, lease.key)
        mask_sent_key(headers, lease.key, placement)
        outcome = policy.classify(200, RESPONSE_HEADERS, RESPONSE_BODY, now_ms())
        pool.release(lease, outcome, now_ms())
        t1 = clock()
        if i == 0 and not isinstance(lease, Lease):
            raise SystemExit(f"bench: no key in scenario {scenario!r}: {lease}")
        i += 1
        if stop_at is None:  # warming up
            if i >= warmup or t1 > warm_until:
                stop_at = clock() + int(max_s * 1e9)
            continue
        samples.append(t1 - t0)
        if len(samples) >= max_iters or (t1 > stop_at and len(samples) >= 50):
            break
    if headers.get("x-api-key", "").startswith("sk-kimi-benchkey"):
        raise SystemExit("bench: the key was not masked")
    return Cell(strategy, scenario, keys, samples)


def full_hooks(keys: int, max_iters: int, max_s: float, warmup: int) -> dict[str, list[int]]:
    """The addon's real hooks on test flows (mitmproxy.test), timed per hook: everything
    the addon does for one successful request, not only the pool's part."""
    import asyncio
    import tempfile

    from mitmproxy.test import taddons, tflow, tutils

    from rotator.proxy.addon import KimiRotator
    from testbed.hooks import call_hook

    async def run(path: Path) -> dict[str, list[int]]:
        addon = KimiRotator()
        parts: dict[str, list[int]] = {"request": [], "responseheaders": [], "response": [], "total": []}
        clock = time.perf_counter_ns
        with taddons.context(addon) as tctx:
            tctx.configure(addon, kimi_accounts=str(path), kimi_hosts=["api.kimi.com"])
            stop_at = clock() + int(max_s * 1e9)
            for i in range(warmup + max_iters):
                if i % FLUSH_EVERY == 0:
                    addon.pool.take_changes()
                flow = tflow.tflow(req=tutils.treq(host="api.kimi.com", port=443,
                                                   headers=REQUEST_HEADERS.copy()))
                flow.client_conn.peername = ("127.0.0.1", 50000)
                response = tutils.tresp(content=RESPONSE_BODY)
                response.headers = RESPONSE_HEADERS.copy()
                t0 = clock()
                await call_hook(addon, "request", flow)
                t1 = clock()
                flow.response = response
                addon.responseheaders(flow)
                t2 = clock()
                await call_hook(addon, "response", flow)
                t3 = clock()
                if i >= warmup:
                    for name, took in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                        parts[name].append(took)
                    if t3 > stop_at and len(parts["total"]) >= 50:
                        break
        if C.bench_key(0)[-8:] in flow.request.headers.get("x-api-key", ""):
            raise SystemExit("bench: the key was not masked")
        return parts

    with tempfile.TemporaryDirectory(prefix="kimi-bench-hooks-") as d:
        path = C.make_accounts_file(Path(d) / "kimi-accounts.json", keys)
        return asyncio.run(run(path))


def timer_overhead_ns() -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(20_000):
        t0 = clock()
        t1 = clock()
        samples.append(t1 - t0)
    return C.median(samples)


def profile_cell(spec: str, max_s: float) -> None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        raise SystemExit("bench: --profile needs pyinstrument (pip install pyinstrument; a dev tool)")
    strategy, scenario, keys = (s.strip() for s in spec.split(","))
    profiler = Profiler(interval=0.0001)
    profiler.start()
    cell = run_cell(strategy, scenario, int(keys), 10**9, max_s, 100)
    profiler.stop()
    print(f"profile of {strategy} / {scenario} / {keys} keys: {len(cell.samples_ns)} iterations, "
          f"median {cell.median_us:.1f} µs")
    print(profiler.output_text(unicode=True, color=False, show_all=False))


def growth_exponent(small: float, large: float, n_small: int, n_large: int) -> float:
    return math.log(large / small) / math.log(n_large / n_small)


def main() -> int:
    ap = C.parser(__doc__.split("\n")[0])
    ap.add_argument("--profile", metavar="STRATEGY,SCENARIO,KEYS",
                    help="instead of the table, profile one cell with pyinstrument, "
                         "e.g. 'health-based,active cooling,1000'")
    args = ap.parse_args()
    max_iters, max_s, warmup = (2_000, 0.1, 20) if args.quick else (50_000, 1.0, 200)
    C.print_header("hook cost vs pool size (in process, no network)",
                   [f"per cell: up to {max_iters} iterations or {max_s:g} s (at least 50) after {warmup} "
                    f"warm-up iterations; gc on; timer overhead {timer_overhead_ns():.0f} ns (not subtracted)",
                    f"request headers: {len(REQUEST_HEADERS)} (an Anthropic-SDK client's set)"])
    with C.watchdog(120 if args.quick else 600):
        if args.profile:
            profile_cell(args.profile, 5.0 if not args.quick else 1.0)
            return 0
        cells: dict[tuple[str, str, int], Cell] = {}
        for scenario in SCENARIOS:
            for strategy in STRATEGIES:
                for keys in SIZES:
                    gc.collect()
                    cells[strategy, scenario, keys] = run_cell(strategy, scenario, keys, max_iters, max_s, warmup)
        hooks = {keys: full_hooks(keys, max_iters, max_s, warmup) for keys in SIZES}

    print("median / p99 in µs per request (all hook work for one request)")
    rows = []
    for scenario in SCENARIOS:
        for strategy in STRATEGIES:
            row = [scenario, strategy]
            for keys in SIZES:
                c = cells[strategy, scenario, keys]
                row.append(f"{c.median_us:.1f} / {c.p99_us:.1f}")
            last = [cells[strategy, scenario, k].median_us for k in (1_000, 10_000)]
            row.append(f"{growth_exponent(last[0], last[1], 1_000, 10_000):.2f}")
            rows.append(row)
    C.print_table(["scenario", "strategy", *[f"{k} keys" for k in SIZES], "growth 1k→10k"], rows)
    print("(growth: log(cost 10k / cost 1k) / log 10; 0 = flat, 1 = linear in the number of keys)")
    print()

    print("targets: median ≤ 10 µs at 100 keys, ≤ 40 µs at 1,000; growth no worse than linear "
          "(exponent ≤ 1.15 from 100→1k and 1k→10k, a little slack for noise)")
    all_ok = True
    for scenario in SCENARIOS:
        for strategy in STRATEGIES:
            parts = []
            for keys, limit in TARGET_US.items():
                m = cells[strategy, scenario, keys].median_us
                all_ok &= m <= limit
                parts.append(f"{m:6.1f} µs @{keys:,} ≤ {limit:g}: {C.verdict(m <= limit):7}")
            exps = [growth_exponent(cells[strategy, scenario, a].median_us,
                                    cells[strategy, scenario, b].median_us, a, b)
                    for a, b in ((100, 1_000), (1_000, 10_000))]
            linear = all(e <= 1.15 for e in exps)
            all_ok &= linear
            print(f"  {scenario:20} {strategy:12} {'; '.join(parts)}; growth {exps[0]:.2f}, {exps[1]:.2f}: "
                  f"{C.verdict(linear)}")
    print()

    print("vs the TypeScript plugin (~6 ms/request at 3 keys, 9 ms at 100, 40 ms at 1,000): "
          "how many times cheaper")
    rows = []
    for scenario in SCENARIOS:
        for strategy in STRATEGIES:
            rows.append([scenario, strategy] + [
                f"{TYPESCRIPT_MS[k] * 1000 / cells[strategy, scenario, k].median_us:,.0f}×"
                for k in TYPESCRIPT_MS])
    C.print_table(["scenario", "strategy", *[f"{k} keys" for k in TYPESCRIPT_MS]], rows)
    print()

    print("the addon's whole hooks on a test flow (request + responseheaders + response; "
          "health-based, all keys ready): median / p99 µs")
    rows = []
    for part in ("request", "responseheaders", "response", "total"):
        rows.append([part] + [f"{C.median(hooks[k][part]) / 1000:.1f} / {C.percentile(hooks[k][part], 99) / 1000:.1f}"
                              for k in SIZES])
    C.print_table(["hook", *[f"{k} keys" for k in SIZES]], rows)
    print("(includes what the pool-only figures above leave out: the client check, metadata, "
          "the flow comment, reading the body)")
    if args.quick:
        print("(--quick: few iterations per cell; the figures are rough)")
    print(f"\noverall: {C.verdict(all_ok)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
