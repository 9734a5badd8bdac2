"""Shared pieces of the benchmarks: processes, the load generator, numbers, output.

Processes come from testbed/processes.py (``start_mitmdump``, ``start_fake_kimi_process``);
this module only adds what benchmarks need on top: the two proxy arms, wrk, CPU time
of a process, and uniform output (the command, the machine, tables, verdicts).

Everything listens on and talks to 127.0.0.1 only. Every load run is bounded in time
(wrk ``-d``) and every script arms a watchdog (``watchdog``) so it stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from testbed import processes  # noqa: E402

ADDON_SCRIPT = REPO_ROOT / "kimi_rotator_addon.py"
MESSAGES_PATH = "/coding/v1/messages"
PLACEHOLDER_KEY = "sk-kimi-placeholder"
REQUEST_BODY = {"model": "kimi-for-coding", "max_tokens": 64,
                "messages": [{"role": "user", "content": "hi"}]}


# -- command line, output -----------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true",
                    help="a few seconds, to check that the benchmark works (figures are rough)")
    return ap


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO_ROOT))
    except ValueError:
        shown = str(script)
    return shlex.join([sys.executable, shown, *sys.argv[1:]])


def machine_info(extra: Iterable[str] = ()) -> list[str]:
    import mitmproxy.version

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"machine: nproc={usable} (cpu_count={cpus}), load average {load} at start, "
        f"{platform.system()} {platform.release()}",
        f"python {platform.python_version()} ({sys.executable}), mitmproxy {mitmproxy.version.VERSION}",
    ]
    lines += list(extra)
    return lines


def print_header(title: str, extra: Iterable[str] = ()) -> None:
    print(f"== {title} ==")
    print(f"command: (cd {REPO_ROOT} && {command_line()})")
    for line in machine_info(extra):
        print(line)
    print()


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    text_rows = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in text_rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    print(fmt.format(*headers))
    for r in text_rows:
        print(fmt.format(*r))


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Stop the script (running its cleanups) if it runs longer than ``seconds``."""

    def expire(signum, frame):  # noqa: ANN001
        raise SystemExit(f"bench: time limit of {seconds:.0f} s reached, stopping")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"kimi-bench-{prefix}-") as d:
        yield Path(d)


# -- numbers --------------------------------------------------------------------------

def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.3f}..{max(values):.3f}" if values else "-"


# -- the accounts file ------------------------------------------------------------------

def bench_key(i: int) -> str:
    return f"sk-kimi-benchkey-{i:08d}"


def make_accounts_file(path: Path, keys: int, strategy: str = "health-based",
                       numbers: tuple[int, ...] = ()) -> Path:
    """An accounts file with bench keys 0…keys-1 (or those `numbers`)."""
    from rotator.core.models import Account, AccountsFile
    from rotator.store.file import write_accounts

    state = AccountsFile(
        accounts=[Account(key=bench_key(i), name=f"bench-{i}") for i in (numbers or range(keys))],
        rotation_strategy=strategy,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_accounts(path, state)
    return path


def sum_counts(counts: dict[str, tuple[int, int]], keys: Sequence[str]) -> tuple[int, int]:
    """(total requests, successful requests) of `keys` together."""
    found = [counts.get(key, (0, 0)) for key in keys]
    return sum(total for total, _ in found), sum(ok for _, ok in found)


def read_key_counts(path: Path) -> dict[str, tuple[int, int]]:
    """(total requests, successful requests) per key in the file."""
    data = json.loads(path.read_text())
    return {a["key"]: (a.get("totalRequests", 0), a.get("successfulRequests", 0)) for a in data.get("accounts", [])}


def read_counts(path: Path) -> tuple[int, int]:
    """(total requests, successful requests) summed over the file's keys."""
    counts = read_key_counts(path)
    return sum_counts(counts, list(counts))


# -- processes --------------------------------------------------------------------------

@contextmanager
def fake_kimi(*args: str, module: str | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """The fake Kimi server as its own process (processes.start_fake_kimi_process).

    ``module`` runs another module with the same command line instead of
    ``testbed.fake_kimi`` (bench._stamped_fake); testbed.processes reads the module name
    from its ``FAKE_KIMI_MODULE`` global when called.
    """
    saved = processes.FAKE_KIMI_MODULE
    if module is not None:
        processes.FAKE_KIMI_MODULE = module
    try:
        proc, port = processes.start_fake_kimi_process(*args)
    finally:
        processes.FAKE_KIMI_MODULE = saved
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def start_proxy(work: Path, name: str, upstream_port: int, *, addon: bool,
                accounts: Path | None = None, options: dict[str, object] | None = None,
                scripts: Sequence[Path] = (), wrapper: Sequence[str] = ()) -> processes.Proxy:
    """mitmdump in reverse mode to the fake server, with or without the rotator addon.

    Both arms get ``flow_detail=0`` (no per-flow console output) and testbed.processes's
    tiny readiness script (a ``running`` hook only); the addon arm also gets the
    accounts file and ``kimi_hosts=127.0.0.1`` so that requests to the fake count as
    Kimi requests, and neither the status page nor quota polling unless `options` asks.
    `scripts`: more addons, loaded first; `wrapper`: a command mitmdump runs under
    (valgrind: then it is given minutes to start).
    """
    opts: dict[str, object] = {"flow_detail": 0}
    addons: list[Path] = list(scripts)
    if addon:
        if accounts is None:
            raise ValueError("the addon arm needs an accounts file")
        addons.append(ADDON_SCRIPT)
        # The key work alone: no status page, no quota polling (an arm turns them on).
        opts.update(kimi_accounts=str(accounts), kimi_hosts="127.0.0.1", kimi_status="off",
                    kimi_usage_interval=0)
    opts.update(options or {})
    slow = {"timeout": 900.0, "ready_timeout": 600.0} if wrapper else {}
    return processes.start_mitmdump(
        addons=addons, mode=f"reverse:http://127.0.0.1:{upstream_port}",
        options=opts, confdir=work / f"mitm-{name}", wrapper=wrapper, **slow)


def check_one_request(base_url: str) -> None:
    """One plain request through a proxy: it must answer 200 with the fake's JSON."""
    port = int(base_url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", MESSAGES_PATH, json.dumps(REQUEST_BODY),
                     {"content-type": "application/json", "x-api-key": PLACEHOLDER_KEY})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200 or b"hello from fake kimi" not in body:
        raise SystemExit(f"bench: {base_url} answered {resp.status}: {body[:300]!r}")


def process_cpu_ns(pid: int) -> int:
    """CPU time (ns) used so far by all threads of a process (from schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass  # a thread that just ended
    return total


# -- the load generator: wrk ------------------------------------------------------------

WRK_LUA = """\
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "%(key)s"
wrk.headers["anthropic-version"] = "2023-06-01"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK-RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, ' ..
    '"mean_us": %%.1f, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx/3xx answers
    client_cpu_s: float  # CPU time wrk itself used

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_path() -> str:
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("bench: wrk is needed as the load generator: apt-get install wrk")
    return found


def wrk_version() -> str:
    out = subprocess.run([wrk_path(), "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0].strip()


def write_wrk_script(work: Path) -> Path:
    script = work / "post_messages.lua"
    script.write_text(WRK_LUA % {"body": json.dumps(REQUEST_BODY), "key": PLACEHOLDER_KEY})
    return script


def run_wrk(base_url: str, script: Path, connections: int, seconds: int) -> WrkResult:
    """POST small Messages requests over ``connections`` keep-alive connections (one wrk thread)."""
    url = base_url + MESSAGES_PATH
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"refusing to load anything but 127.0.0.1: {url}")
    cmd = [wrk_path(), "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
           "-s", str(script), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"^WRK-RESULT (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {shlex.join(cmd)}\n{out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    return WrkResult(
        requests=r["requests"],
        seconds=r["duration_us"] / 1e6,
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        errors=r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"],
        client_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )
