"""bench/team_store.py still runs: the proxy on a Redis store vs on the accounts file.

Like tests/test_bench.py (its helpers are in tests/support/bench.py), it runs the script with --quick as its
own process and checks what a reader of its output checks: it exits 0, every figure it
prints (each round, the summary table, the ratio lines) is a number, each request on
Redis took a team slot and gave it back with the next take (about one EVALSHA per
request), and its correctness checks held
(no wrk errors, each store's counts match what its fake Kimi saw, no slot left held).
The 0.9 target is *not* checked: a few-second run on a small shared machine is rough.

It needs wrk and redis-server; without either it fails (never a skip: a benchmark that
silently stopped running is what these tests are here to catch).
"""

from __future__ import annotations

import pytest

from tests.support.bench import NUMBER, VERDICT, findall, positive, require_redis_server, require_wrk, run_bench, search

pytestmark = pytest.mark.slow  # each test starts a process or a server

CELLS = [(1, 1), (1, 16), (3, 1), (3, 16)]  # (proxies loaded at once, clients per proxy)
ARMS = ("file", "redis")


def test_team_store_quick() -> None:
    require_wrk()
    require_redis_server()
    out = run_bench("team_store.py")
    assert "load generator: wrk" in out, out
    search(r"^redis: --set kimi_store=redis://127\.0\.0\.1:\d+/0 for every proxy", out, "the redis arm")
    for proxies, clients in CELLS:
        title = rf"-- {proxies} prox(?:y|ies), {clients} client\(s\) each --"
        section = search(rf"^{title}\n((?:  .*\n)+)", out, f"{proxies} proxies, {clients} clients").group(1)
        for arm in ARMS:
            m = search(rf"^  round 1 {arm}\s*:\s+({NUMBER}) req/s\s+p50\s+({NUMBER}) ms\s+p99\s+({NUMBER}) ms"
                       rf"\s+mitmdump\s+({NUMBER}) CPU µs/req\s+redis\s+({NUMBER}|-) CPU µs/req"
                       rf"\s+EVALSHA/req\s+({NUMBER}|-)\s+errors (\d+)$", section, f"{section} {arm}")
            for value, what in zip(m.groups()[:4], ("req/s", "p50", "p99", "mitmdump CPU µs/req")):
                positive(value, f"{proxies} proxies, {clients} clients, {arm} {what}", out)
            assert m.group(7) == "0", f"wrk errors through the {arm} arm ({proxies} proxies, {clients} clients):\n{out}"
            if arm == "redis":
                positive(m.group(5), "redis-server CPU µs/req", out)
                # A team slot taken before each request; given back with the next take (a
                # script of its own only when no take comes within GIVE_DELAY_MS): about one
                # script per request, two at most.
                assert 0.95 <= float(m.group(6)) <= 1.6, f"EVALSHA per request {m.group(6)}:\n{out}"
            else:
                assert m.group(5) == m.group(6) == "-", out
        for arm in ARMS:
            search(rf"^\s+{proxies}\s+{clients}\s+{arm}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}"
                   rf"\s+(?:{NUMBER}|-)\s+(?:{NUMBER}|-)$", out, f"summary row {proxies} {clients} {arm}")
    ratios = findall(rf"^  (\d) prox(?:y  |ies), +(\d+) client\(s\) each: throughput ({NUMBER}) \(per round "
                     rf"{NUMBER}\.\.{NUMBER}\): target ≥ 0\.9: {VERDICT}; added latency p50 ([+-]{NUMBER}) ms, "
                     rf"p99 ([+-]{NUMBER}) ms$", out)
    assert [(int(p), int(c)) for p, c, *_ in ratios] == CELLS, f"ratio lines:\n{out}"
    for _, _, ratio, _, _ in ratios:
        positive(ratio, "throughput redis / file", out)
    search(rf"^overall \(throughput at 16 clients per proxy, 1 and 3 proxies, redis/file ≥ 0\.9\): {VERDICT}$",
           out, "the overall verdict")
    for arm in ARMS:
        m = search(rf"^check: {arm} arm, whole run: the store counts (\d+) requests \((\d+) successful\) after "
                   rf"shutdown; its fake Kimi saw (\d+), clients got (\d+) answers, wrk's stops cut off at most "
                   rf"(\d+): consistent$", out, f"the {arm} arm's whole-run count")
        total, successes, seen, answered, _ = map(int, m.groups())
        assert total >= seen > 0 and successes >= answered > 0, out
        search(rf"^check: {arm} arm, last 60 requests \(20 through each proxy at once, then shutdown\): the store "
               rf"counted 60 \(60 successful\), its fake Kimi saw 60: exact$", out, f"the {arm} arm's exact count")
    search(r"^check: redis arm: team slots still held after shutdown: 0; its unused accounts file stays absent$",
           out, "the slots check")
    assert "WARNING" not in out and "MISSING COUNTS" not in out and "MISMATCH" not in out, out
