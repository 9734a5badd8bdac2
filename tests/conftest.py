"""The tests' fixtures (pytest finds them by name; nothing here is imported): the addon
in taddons on a fake clock (`proxy`), a fake Kimi server, an accounts file, real
mitmdump proxies, and a real redis-server. What tests import is in tests/support/."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rotator.proxy.addon import KimiRotator
from testbed.fake_kimi import FakeKimi
from testbed.hooks import FakeClock
from testbed.processes import Proxy, start_mitmdump
from testbed.receiver import Receiver
from testbed.redis_server import RedisServer
from tests.support.accounts import KEYS, write_pool
from tests.support.harness import ADDON_SCRIPT, FLUSH_INTERVAL_S, LOOPBACK_DNS
from tests.support.in_process import Answer, FakeUpstream, addon_in_taddons

_counter = itertools.count()
pytest_plugins = ["tests.support.tiers", "pytester"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def proxy(tmp_path: Path, clock: FakeClock) -> Iterator[Callable[..., tuple[KimiRotator, FakeUpstream]]]:
    """start(answer, keys=KEYS, fields=None, **options) -> (addon, upstream): the addon
    in taddons on the `clock`, its own requests and the client's going to a fake
    upstream that answers with answer(flow, key); its pool written by write_pool."""
    with contextlib.ExitStack() as running:

        def start(answer: Answer, keys: list[str] = KEYS, fields: dict[str, dict[str, Any]] | None = None,
                  **options: Any) -> tuple[KimiRotator, FakeUpstream]:
            path = write_pool(tmp_path / "accounts.json", keys, fields=fields)
            upstream = FakeUpstream(answer)
            options = {"kimi_hosts": ["api.kimi.com"], "kimi_status": "off", **options}
            addon, _ = running.enter_context(addon_in_taddons(path, clock=clock, send=upstream, **options))
            return addon, upstream

        yield start


@pytest.fixture
def fake_kimi() -> Iterator[FakeKimi]:
    with FakeKimi() as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own: loopback, a free port, persistence off, its
    files in <tmp>/redis; stopped at the end."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A notification receiver on 127.0.0.1 (apprise's json://127.0.0.1:PORT/), closed at the end."""
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def keys() -> list[str]:
    return list(KEYS)


@pytest.fixture
def accounts_path(tmp_path: Path) -> Path:
    return tmp_path / "config" / "kimi-accounts.json"


@pytest.fixture
def write_accounts(accounts_path: Path) -> Callable[..., Path]:
    """write_accounts(keys, strategy="round-robin", **file_fields): write_pool at accounts_path."""

    def write(keys: list[str], strategy: str = "round-robin", **top: Any) -> Path:
        return write_pool(accounts_path, keys, strategy, **top)

    return write


@pytest.fixture
def start_proxy(tmp_path: Path, accounts_path: Path) -> Iterator[Callable[..., Proxy]]:
    """start_proxy(fake, mode="reverse"|"regular", options={...}) -> a running mitmdump.

    Reverse mode points at the fake server and treats 127.0.0.1 as the Kimi host.
    Regular mode loads the loopback DNS shim so names like api.kimi.com reach the fake.
    Every proxy is stopped (SIGINT, so the addon's final save runs) at teardown.
    """
    started: list[Proxy] = []

    def start(
        fake: FakeKimi,
        mode: str = "reverse",
        options: dict[str, str] | None = None,
        extra_addons: tuple[Path, ...] = (),
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> Proxy:
        # No quota polling unless a test asks for it (its /usages requests would show in
        # the fake's counts of every other test), and no status page (tests that want one
        # ask for port 0: two proxies can't share the default port).
        opts = {
            "kimi_accounts": str(accounts_path), "kimi_flush_interval": str(FLUSH_INTERVAL_S),
            "kimi_usage_interval": "0", "kimi_status": "off",
        }
        addons: list[Path] = [ADDON_SCRIPT, *extra_addons]
        if mode == "reverse":
            mitm_mode: str | None = f"reverse:{fake.url}"
            opts["kimi_hosts"] = "127.0.0.1"
        else:
            mitm_mode = None
            addons.append(LOOPBACK_DNS)
            opts["loopback_dns_port"] = str(fake.port)
        opts.update(options or {})
        proxy = start_mitmdump(
            addons=addons,
            mode=mitm_mode,
            options=opts,
            env=env,
            confdir=tmp_path / f"mitm{next(_counter)}",
            extra_args=extra_args,
        )
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
