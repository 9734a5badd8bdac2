"""Processes the tests and the benchmarks both run, each on 127.0.0.1: a real ``mitmdump``
(``start_mitmdump``, ready once its start-up is over) and the fake Kimi server as its
own process (``start_fake_kimi_process``). Nothing here imports rotator or tests.

::

    proxy = start_mitmdump(
        addons=["kimi_rotator_addon.py", LOOPBACK_DNS],   # LOOPBACK_DNS: tests.support.harness
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
from typing import Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_KIMI_MODULE = "testbed.fake_kimi"

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


class OutputCollector:
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
    _out: OutputCollector = field(repr=False)

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


def child_env(env: Mapping[str, str] | None) -> dict[str, str]:
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
        env=child_env(env), cwd=str(cwd or REPO_ROOT))
    out = OutputCollector(proc.stdout)

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
    """``python -m testbed.fake_kimi --port 0`` as a child; returns (process, port).
    Stop it with ``process.send_signal(SIGINT)`` / ``terminate()``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", FAKE_KIMI_MODULE, "--port", "0", *extra_args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, cwd=str(REPO_ROOT), env=child_env(None))
    out = OutputCollector(proc.stdout)
    m = out.wait_for(re.compile(r"listening on 127\.0\.0\.1:(\d+)"), timeout)
    if m is None:
        proc.kill()
        raise RuntimeError(f"fake_kimi did not start:\n{out.text()}")
    proc._collector = out  # type: ignore[attr-defined]  # keep the pipe drained
    return proc, int(m.group(1))
