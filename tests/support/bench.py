"""Running a benchmark script as a person would (``bench/<script> --quick``) and reading
its output: its figures as numbers, its verdict lines, and the tools it needs (wrk,
redis-server) present or the test fails, never skips."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mitmproxy.version
import pytest

from testbed.processes import REPO_ROOT
from testbed.redis_server import REDIS_SERVER

BENCH = REPO_ROOT / "bench"
TIMEOUT_S = 240  # each script has its own watchdog well below this; --quick takes 5-15 s

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
VERDICT = r"(?:MET|NOT MET)"


def number(text: str) -> float:
    return float(text.replace(",", ""))


def require_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        pytest.fail(
            "wrk is not installed, and the benchmarks use it as their load generator. "
            "Install it: `apt-get install wrk` (Debian/Ubuntu; .ci/run does this), "
            "`brew install wrk` (macOS), or build it from https://github.com/wg/wrk",
            pytrace=False,
        )
    return found


def run_bench(script: str, *args: str, timeout_s: float = TIMEOUT_S) -> str:
    """Run bench/<script> --quick ARGS; its output (stdout and stderr) once it exited 0."""
    cmd = [sys.executable, str(BENCH / script), "--quick", *args]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{script} --quick did not finish in {timeout_s} s:\n{out}", pytrace=False)
    output = done.stdout + ("\n--- stderr ---\n" + done.stderr if done.stderr.strip() else "")
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{output}"
    check_header(output)
    return output


def check_header(output: str) -> None:
    """The command, and the interpreter and mitmproxy this very suite runs on."""
    assert re.search(r"^command: \(cd .+ && .+ --quick", output, re.M), output
    assert re.search(r"^machine: nproc=\d+", output, re.M), output
    line = f"python {'.'.join(map(str, sys.version_info[:3]))} ({sys.executable}), " \
           f"mitmproxy {mitmproxy.version.VERSION}"
    assert line in output, f"expected {line!r} in:\n{output}"
    assert "Traceback" not in output, output


def search(pattern: str, output: str, what: str) -> re.Match[str]:
    m = re.search(pattern, output, re.M)
    assert m is not None, f"{what}: no line matching {pattern!r} in:\n{output}"
    return m


def findall(pattern: str, output: str) -> list[tuple[str, ...]]:
    return [m if isinstance(m, tuple) else (m,) for m in re.findall(pattern, output, re.M)]


def positive(text: str, what: str, output: str) -> float:
    value = number(text)
    assert math.isfinite(value) and value > 0, f"{what} = {text}, expected a positive figure:\n{output}"
    return value


def require_redis_server() -> None:
    if not Path(REDIS_SERVER).exists():
        pytest.fail(
            "redis-server is not installed, and bench/team_store.py runs its Redis arm on a real one. "
            "Install it: `apt-get install redis-server` (Debian/Ubuntu; .ci/run does this) or "
            "`brew install redis` (macOS)",
            pytrace=False,
        )
