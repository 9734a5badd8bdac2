"""Shared fixtures: a fake Kimi server, an accounts file, real mitmdump proxies, and a
real redis-server."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rotator.core.models import Account, AccountsFile
from rotator.store import file as storage
from testbed.fake_kimi import FakeKimi
from testbed.processes import REPO_ROOT, Proxy, start_mitmdump
from testbed.receiver import Receiver
from testbed.redis_server import RedisServer
from tests.harness import LOOPBACK_DNS

ADDON_SCRIPT = REPO_ROOT / "kimi_rotator_addon.py"
FLUSH_INTERVAL_S = 0.2  # start_proxy's kimi_flush_interval: a proxy saves this often
_counter = itertools.count()
pytest_plugins = ["tests.tiers", "pytester"]


def fake_key(label: str | int) -> str:
    """An obviously fake key of the real shape: sk-kimi- plus 32 characters."""
    return f"sk-kimi-FAKE{str(label):0>28}"[:40]


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
    return [fake_key(f"key{i}") for i in range(3)]


@pytest.fixture
def accounts_path(tmp_path: Path) -> Path:
    return tmp_path / "config" / "kimi-accounts.json"


@pytest.fixture
def write_accounts(accounts_path: Path) -> Callable[..., Path]:
    """write_accounts(keys, strategy="round-robin", **account_fields_by_index)."""

    def write(keys: list[str], strategy: str = "round-robin", **top: object) -> Path:
        accounts = [Account(key=key, name=f"Account {i}") for i, key in enumerate(keys)]
        storage.write_accounts(
            accounts_path, AccountsFile(accounts=accounts, rotation_strategy=strategy, **top)
        )
        return accounts_path

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
