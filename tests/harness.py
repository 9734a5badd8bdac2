"""The tests' shared tools: a real ``mitmdump`` subprocess for end-to-end tests
(loopback only), and the one way each to run the CLI (``run_cli``), read an SSE stream
(``sse_events``), read the accounts file's counts (``counts_on_disk``, against the fake
server's ``counts_seen``) and wait for something to happen (``poll``).

::

    proxy = start_mitmdump(
        addons=[REPO_ROOT / "rotator" / "addon.py", LOOPBACK_DNS],
        options={"loopback_dns_port": str(kimi.port)},
        confdir=tmp_path / "mitm",
    )                                   # regular mode on 127.0.0.1:<ephemeral>
    httpx.get("http://api.kimi.com/coding/v1/models", proxy=proxy.url, ...)
    proxy.stop()                        # SIGINT, so addons' done() hooks run
    assert "something" in proxy.output()

Reverse mode: ``start_mitmdump(..., mode=f"reverse:{kimi.url}")``; send requests
to ``proxy.url`` directly.

mitmdump 11.0.2 prints (each line prefixed with ``[HH:MM:SS.mmm] ``):
``HTTP(S) proxy listening at 127.0.0.1:PORT.`` (regular) and
``reverse proxy to http://127.0.0.1:UP listening at 127.0.0.1:PORT.`` (reverse).
``LISTEN_RE`` matches both; the port is read from it.

The child gets ``PYTHONUNBUFFERED=1`` (else the line sits in a pipe buffer) and
the repository root prepended to ``PYTHONPATH`` (so a ``-s`` script can
``import rotator``); stdout and stderr are merged into one log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK_DNS = Path(__file__).resolve().parent / "loopback_dns.py"
FAKE_KIMI_MODULE = "tests.fake_kimi"

LISTEN_RE = re.compile(r"listening at (?:\[[0-9a-fA-F:.]+\]|[0-9.]+):(\d+)")
READY_RE = re.compile(r"^HARNESS-READY listen=(\S*) deferred=(\S*)$", re.M)

# Loaded last into mitmdump (written into the run's confdir as a script).
# mitmdump prints its "listening at" line *before* its final startup error check:
# errors logged by an addon's load/configure/running make it print "Error logged
# during startup, exiting..." and exit 1 right after. That check ends with
# ``errorcheck.finish()``; this addon prints its marker from there, so the marker means
# "startup is over and passed the check" (no sleep). It also reports ``--set`` options
# that no addon claimed (mitmdump ignores those silently).
READY_SCRIPT = """\
from mitmproxy import ctx


class HarnessReady:
    def running(self):
        ps = ctx.master.addons.get("proxyserver")
        addrs = ps.listen_addrs() if ps else []
        listen = ",".join(f"{a[0]}:{a[1]}" for a in addrs)
        deferred = ",".join(sorted(getattr(ctx.options, "deferred", {}) or {}))
        marker = f"HARNESS-READY listen={listen} deferred={deferred}"
        check = ctx.master.addons.get("errorcheck")
        if check is None:  # no startup check to wait for
            print(marker, flush=True)
            return
        finish = check.finish

        def finished():
            finish()
            print(marker, flush=True)

        check.finish = finished


addons = [HarnessReady()]
"""


def mitmdump_path() -> str:
    """``mitmdump`` next to the running interpreter (the venv), else on PATH."""
    cand = Path(sys.executable).parent / "mitmdump"
    if cand.exists():
        return str(cand)
    found = shutil.which("mitmdump")
    if not found:
        raise FileNotFoundError("mitmdump not found next to sys.executable or on PATH")
    return found


class _OutputCollector:
    def __init__(self, stream) -> None:
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self.closed = False
        self._thread = threading.Thread(target=self._run, args=(stream,),
                                        name="mitmdump-output", daemon=True)
        self._thread.start()

    def _run(self, stream) -> None:
        try:
            for line in iter(stream.readline, ""):
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float,
                 start: int = 0) -> re.Match[str] | None:
        """First match of ``pattern`` in the output from char ``start`` on."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search("".join(self._lines), start)
                if m or self.closed:
                    return m
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class Proxy:
    process: subprocess.Popen
    port: int
    url: str  # "http://127.0.0.1:PORT"
    confdir: Path
    args: list[str]
    _out: _OutputCollector = field(repr=False)

    def output(self) -> str:
        """All stdout+stderr so far."""
        return self._out.text()

    def wait_for_output(self, pattern: str | re.Pattern[str], timeout: float = 5.0,
                        start: int = 0) -> re.Match[str] | None:
        """Wait until ``pattern`` (regex) appears in the output; None on timeout/exit."""
        return self._out.wait_for(pattern, timeout, start)

    @property
    def ca_cert(self) -> Path:
        """The run's CA certificate (PEM), for ``verify=`` / NODE_EXTRA_CA_CERTS."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout: float = 10.0, must_exit: bool = True) -> int:
        """SIGINT (so ``done`` hooks run), SIGKILL after ``timeout``; returns exit code.

        A mitmdump still running ``timeout`` s after SIGINT has a shutdown that hangs
        (and loses its last save): with ``must_exit`` that fails the caller, with the
        end of its log, once it is killed."""
        p = self.process
        hung = False
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGINT)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                hung = True
                p.kill()
                p.wait(5)
            except ProcessLookupError:
                pass
        self._out.join(5)
        if p.stdout:
            p.stdout.close()
        if hung and must_exit:
            tail = "\n".join(self.output().splitlines()[-20:])
            raise AssertionError(f"mitmdump did not exit within {timeout:g} s of SIGINT (killed): "
                                 f"its shutdown hung. Its last lines:\n{tail}")
        return p.returncode

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    e = dict(os.environ)
    # A proxy configured for the test runner must not leak into the child.
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
              "all_proxy"):
        e.pop(k, None)
    if env:
        e.update(env)
    e["PYTHONUNBUFFERED"] = "1"
    pp = e.get("PYTHONPATH")
    e["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    return e


def start_mitmdump(*, addons: Iterable[Path | str] = (), mode: str | None = None,
                   options: Mapping[str, object] | None = None,
                   env: Mapping[str, str] | None = None, confdir: Path | str,
                   extra_args: Iterable[str] = (), timeout: float = 20.0,
                   cwd: Path | str | None = None, wait_ready: bool = True,
                   ready_timeout: float = 5.0,
                   allow_unknown_options: bool = False,
                   wrapper: Sequence[str] = ()) -> Proxy:
    """Start mitmdump on 127.0.0.1:<ephemeral> and wait for its "listening at" line.

    ``mode``: the whole ``--mode`` value (None = regular), e.g.
    ``"reverse:http://127.0.0.1:41000"``. ``options``: ``--set k=v`` each (values
    are str()-ed; bools become true/false). Addons are loaded in the given order,
    relative paths against the repository root.

    With ``wait_ready`` (default) a tiny addon (``READY_SCRIPT``, written into
    ``confdir``) is loaded as the last script and the call returns only once
    startup is really over (at most ``ready_timeout`` s after the "listening
    at" line; the marker never comes if a ``--set`` value of the wrong type for
    a script's option made mitmdump 11 silently stop configuring the scripts
    loaded after that one - their configure/running hooks never run).
    ``wrapper``: a command mitmdump runs under (``valgrind --tool=callgrind``, say).
    Raises RuntimeError with the captured output if mitmdump exits or is not
    ready within ``timeout``, or if an ``options`` name was claimed by no addon
    (mitmdump itself ignores such ``--set`` silently) unless
    ``allow_unknown_options``. Beware: a wrongly *typed* value for a script's
    option (``--set some_int_option=abc``) is dropped by mitmdump 11 without
    any message, the option keeps its default and scripts loaded after it are
    never configured (caught here as "did not finish starting").
    """
    confdir = Path(confdir)
    confdir.mkdir(parents=True, exist_ok=True)
    args = [*wrapper, mitmdump_path(), "--listen-host", "127.0.0.1", "-p", "0",
            "--set", f"confdir={confdir}"]
    if mode is not None:
        args += ["--mode", mode]
    for a in addons:
        a = Path(a)
        args += ["-s", str(a if a.is_absolute() else REPO_ROOT / a)]
    for k, v in (options or {}).items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        args += ["--set", f"{k}={v}"]
    if wait_ready:
        ready_script = confdir / "_harness_ready.py"
        ready_script.write_text(READY_SCRIPT)
        args += ["-s", str(ready_script)]
    args += list(extra_args)
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, encoding="utf-8", errors="replace", bufsize=1,
        env=_child_env(env), cwd=str(cwd or REPO_ROOT))
    out = _OutputCollector(proc.stdout)

    def fail(why: str) -> RuntimeError:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        out.join(2)
        return RuntimeError(
            f"mitmdump {why} (exit code {proc.returncode}); command: "
            f"{' '.join(args)}\n--- output ---\n{out.text()}")

    deadline = time.monotonic() + timeout
    m = out.wait_for(LISTEN_RE, timeout)
    if m is None:
        raise fail("did not start")
    port = int(m.group(1))
    if wait_ready:
        ready = out.wait_for(READY_RE, max(0.1, min(ready_timeout,
                                                     deadline - time.monotonic())))
        if ready is None:
            raise fail(
                "did not finish starting: no running() after 'listening at' (exited, or "
                "a --set value of the wrong type for a script option stopped later "
                "scripts from being configured)")
        unknown = [o for o in ready.group(2).split(",") if o]
        if unknown and not allow_unknown_options:
            raise fail(f"ignored unknown option(s) {', '.join(unknown)}")
    return Proxy(proc, port, f"http://127.0.0.1:{port}", confdir, args, out)


def start_fake_kimi_process(*extra_args: str, timeout: float = 10.0
                            ) -> tuple[subprocess.Popen, int]:
    """``python -m tests.fake_kimi --port 0`` as a child; returns (process, port).
    Stop it with ``process.send_signal(SIGINT)`` / ``terminate()``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", FAKE_KIMI_MODULE, "--port", "0", *extra_args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, cwd=str(REPO_ROOT), env=_child_env(None))
    out = _OutputCollector(proc.stdout)
    m = out.wait_for(re.compile(r"listening on 127\.0\.0\.1:(\d+)"), timeout)
    if m is None:
        proc.kill()
        raise RuntimeError(f"fake_kimi did not start:\n{out.text()}")
    proc._collector = out  # type: ignore[attr-defined]  # keep the pipe drained
    return proc, int(m.group(1))


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
    child_env = _child_env(None)
    child_env.pop("KIMI_ROTATOR_ACCOUNTS", None)
    child_env["PYTHONIOENCODING"] = encoding
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "rotator.cli", *argv], input=stdin, capture_output=True,
        text=True, encoding=encoding, cwd=str(REPO_ROOT), env=child_env, timeout=timeout)


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
