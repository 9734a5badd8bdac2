"""bench/instructions.py still runs: mitmdump (and redis-server) under callgrind, instructions
per request for the bare proxy, the addon on a file and the addon on Redis.

Under valgrind each proxy takes about a minute to start, so this one runs longer than
the other benchmarks' quick modes (3 arms, two at a time: about 3 minutes). valgrind
and redis-server missing fail the test (never a skip): .ci/run installs both.
"""

from __future__ import annotations

import shutil

import pytest

from tests.support.bench import NUMBER, VERDICT, positive, require_redis_server, run_bench, search

pytestmark = pytest.mark.slow  # each test starts a process or a server


def test_instructions_quick() -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        pytest.fail("valgrind is not installed, and bench/instructions.py counts instructions with it. "
                    "Install it: `apt-get install valgrind` (.ci/run does this)", pytrace=False)
    require_redis_server()
    out = run_bench("instructions.py", "--redis", timeout_s=1200)
    rows = {}
    for arm in ("bare", "addon", "redis"):
        m = search(rf"^\s*{arm}\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+(\S+)\s+(\S+)\s+({NUMBER})k\s+",
                   out, f"the {arm} row")
        one, _, sixteen, _ = (positive(v, f"{arm} figure", out) for v in m.groups()[:4])
        rows[arm] = (one, sixteen)
        # A proxy's request costs millions of instructions; far fewer means nothing was counted.
        assert 2 < one < 100 and 2 < sixteen < 100, f"{arm}: {one} / {sixteen} M instructions a request:\n{out}"
        if arm == "redis":
            share = search(r"^(\d+)k/(\d+)k$", m.group(5), "redis-server's share")
            assert int(share.group(1)) > 0 and int(share.group(2)) > 0, out
            # One script a request, or two when a slot given back goes on its own (under
            # valgrind requests are far apart, so the next take rarely carries it).
            for scripts in m.group(6).split("/"):
                assert 0.95 <= float(scripts) <= 2.2, f"EVALSHA per request {m.group(6)}:\n{out}"
    for what in ("addon vs bare", "redis vs file store"):
        for connections in (1, 16):
            search(rf"^{what}, {connections:2} connection\(s\): {NUMBER} \(\+?-?{NUMBER}k instructions a request"
                   rf".*\); less idle work {NUMBER}: target ≥ {NUMBER}: {VERDICT}$", out, f"{what}, {connections}")
    # The addon does more than bare mitmdump, and Redis more than the file.
    assert rows["addon"][0] > rows["bare"][0] and rows["redis"][0] > rows["addon"][0], out
