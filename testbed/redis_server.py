"""A real redis-server for tests: on a free loopback port, persistence off, in a temp dir.

`stop()` takes it away and `start()` brings it back on the same port; `password` starts
it with `requirepass` (the default user's password). A missing redis-server fails the
test (never a skip): CI installs it (`.ci/run`).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, tmp: Path, password: str | None = None, wrapper: Sequence[str] = ()) -> None:
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.tmp = tmp
        self.port = free_port()
        self.password = password
        self.wrapper = list(wrapper)  # a command to run it under (valgrind, say)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"default:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [*self.wrapper, REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.tmp)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_s = 60 if self.wrapper else 10
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self._pings():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer PING within {wait_s} s")

    def _pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, keep_data: bool = False) -> None:
        """SIGTERM; with `keep_data`, SHUTDOWN SAVE (one step: no write lands between the
        save and the exit), so `start()` loads the same data back."""
        if keep_data and self.proc is not None:
            try:
                self.command("SHUTDOWN", "SAVE")
            except Exception:
                pass  # the connection closes as the server exits
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None

    def command(self, *args: str) -> object:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        try:
            return client.execute_command(*args)
        finally:
            client.close()
