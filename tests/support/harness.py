"""The tests' shared tools: the one way each to run the CLI (``run_cli``), read an SSE
stream (``sse_events``), read the accounts file's counts (``counts_on_disk``, against the
fake server's ``counts_seen``) and wait for something to happen (``poll``); and
``ADDON_SCRIPT``, the addon as mitmdump loads it, and ``LOOPBACK_DNS``, the addon that
sends api.kimi.com to a fake Kimi on this machine.
The processes the tests and the benchmarks both start (mitmdump, the fake Kimi) are in
testbed.processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from testbed.processes import REPO_ROOT, child_env

ADDON_SCRIPT = REPO_ROOT / "kimi_rotator_addon.py"
LOOPBACK_DNS = Path(__file__).resolve().parent / "loopback_dns.py"
FLUSH_INTERVAL_S = 0.2  # start_proxy's kimi_flush_interval: a proxy saves this often


# -- waiting for, and reading, what a proxy left behind ------------------------------

def poll(probe: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """probe() until it returns something truthy or `timeout` s pass; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def accounts_on_disk(path: Path) -> list[dict[str, Any]]:
    """The accounts in the file as raw JSON objects (camelCase), [] if there is no file."""
    if not path.exists():
        return []
    return json.loads(path.read_text())["accounts"]


def saved_flows(dump: Path) -> tuple[bytes, list[Any]]:
    """A `-w` dump's raw bytes (to search for keys) and its flows."""
    from mitmproxy import io as mitm_io

    raw = dump.read_bytes()
    with dump.open("rb") as f:
        return raw, list(mitm_io.FlowReader(f).stream())


def counts_on_disk(path: Path, keys: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """(totalRequests, successfulRequests) per key, as the accounts file has them now:
    every key in the file, or only those of `keys` that are in it."""
    by_key = {a["key"]: (a.get("totalRequests", 0), a.get("successfulRequests", 0))
              for a in accounts_on_disk(path)}
    return by_key if keys is None else {k: by_key[k] for k in keys if k in by_key}


TOKEN_FIELDS = ("input", "output", "cacheRead", "cacheWrite")


def tokens_on_disk(path: Path) -> dict[str, dict[str, int]]:
    """Per key that spent any, its saved `tokens` with all four names (an absent one is
    0), as the fake's `tokens_reported()` gives them."""
    return {a["key"]: {n: a.get("tokens", {}).get(n, 0) for n in TOKEN_FIELDS} for a in accounts_on_disk(path)
            if any(a.get("tokens", {}).values())}


def counts_seen(fake: Any, keys: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(requests, 2xx answers) per key as the fake Kimi server logged them: what
    `counts_on_disk` must say once the proxy has saved."""
    total = fake.count_by_key()
    ok: dict[str, int] = {}
    for r in fake.requests:
        if r.key is not None and r.status is not None and 200 <= r.status < 300:
            ok[r.key] = ok.get(r.key, 0) + 1
    return {k: (total.get(k, 0), ok.get(k, 0)) for k in keys}


# -- server-sent events ----------------------------------------------------------------

def sse_events(source: str | bytes | Iterable[str], limit: int | None = None
               ) -> list[tuple[str | None, Any]]:
    """(event name, JSON data) of each event in an SSE stream, in order.

    `source` is a whole body (str or bytes) or an iterator of lines without their line
    ends (``httpx.Response.iter_lines()``). An event ends at its blank line; its
    ``data:`` lines are joined with newlines. With `limit`, reading stops right after
    the blank line of the `limit`-th event, so the rest of an iterator can be read
    later (``first = sse_events(lines, 1)`` ... ``rest = sse_events(lines)``). Any
    other line than ``event:``, ``data:``, a comment or a blank one is an error, and
    so is an event cut off before its blank line.
    """
    if isinstance(source, bytes):
        source = source.decode("utf-8")
    lines = iter(source.splitlines() if isinstance(source, str) else source)
    events: list[tuple[str | None, Any]] = []
    name: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                events.append((name, json.loads("\n".join(data))))
                if limit is not None and len(events) >= limit:
                    return events
            name, data = None, []
            continue
        field_name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field_name == "event":
            name = value
        elif field_name == "data":
            data.append(value)
        elif field_name != "":  # ":..." is a comment
            raise AssertionError(f"not an SSE line: {line!r}")
    assert not data and name is None, f"stream ended inside an event: {name!r} {data!r}"
    return events


# -- the CLI ---------------------------------------------------------------------------

def run_cli(accounts: Path | str | None, *args: str, stdin: str | None = None,
            in_process: bool = False, encoding: str = "utf-8",
            env: Mapping[str, str] | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``kimi-rotator [--accounts ACCOUNTS] ARGS...``; its exit code, stdout and stderr.

    By default as its own process (``python -m rotator.cli`` from the repository root,
    as a person runs it next to a proxy; ``KIMI_ROTATOR_ACCOUNTS`` is not passed on
    unless `env` sets it). With `in_process`, through ``rotator.cli.main.main`` in this
    process (fast, and a test may replace its clock or ``sys.argv``): standard output
    is written in `encoding` (as a terminal's would be), `stdin` is what it reads.
    """
    argv = (["--accounts", str(accounts)] if accounts is not None else []) + list(args)
    if in_process:
        return _run_cli_in_process(argv, stdin, encoding)
    cli_env = child_env(None)
    cli_env.pop("KIMI_ROTATOR_ACCOUNTS", None)
    cli_env["PYTHONIOENCODING"] = encoding
    cli_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "rotator.cli", *argv], input=stdin, capture_output=True,
        text=True, encoding=encoding, cwd=str(REPO_ROOT), env=cli_env, timeout=timeout)


def _run_cli_in_process(argv: list[str], stdin: str | None, encoding: str
                        ) -> subprocess.CompletedProcess[str]:
    import contextlib
    import io

    import rotator.cli.main as cli

    out = io.TextIOWrapper(io.BytesIO(), encoding=encoding, write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    saved_stdin = sys.stdin
    try:
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        sys.stdin = saved_stdin

    def text(stream: io.TextIOWrapper) -> str:
        stream.flush()
        return stream.buffer.getvalue().decode(stream.encoding)  # type: ignore[attr-defined]

    return subprocess.CompletedProcess(["kimi-rotator", *argv], code, text(out), text(err))
