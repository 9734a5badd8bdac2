"""The test tiers: `slow` marks a test that starts a process or a server (mitmdump,
redis-server, Chromium, Node, the fake Kimi, a benchmark); `pytest -m "not slow"` runs
the rest, in-process, in seconds. A test outside `slow` that starts either fails,
naming the mark it lacks, so the fast tier stays fast without anyone policing it."""

from __future__ import annotations

import socket
import subprocess

import pytest

# Tests that use these fixtures start a server or a process: they are in the slow tier.
SLOW_FIXTURES = frozenset({"fake_kimi", "redis_server", "start_proxy", "receiver"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _in_process_unless_slow(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pytest -m "not slow"` is the in-process tier: a test there that starts a process
    or a server fails, naming the mark it lacks, rather than quietly making the tier slow."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(what: str) -> AssertionError:
        return AssertionError(f"{request.node.nodeid} {what}: mark it pytest.mark.slow")

    def no_process(self: subprocess.Popen[bytes], args: object, *rest: object, **kw: object) -> None:
        raise refuse(f"starts a process ({args!r})")

    def no_server(self: socket.socket, *args: object) -> None:
        raise refuse(f"starts a server (listens on {self.getsockname()!r})")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", no_process)
    monkeypatch.setattr(socket.socket, "listen", no_server)
