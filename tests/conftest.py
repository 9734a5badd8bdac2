"""Shared fixtures: a fake Kimi server, an accounts file, and real mitmdump proxies."""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rotator import storage
from rotator.models import Account, AccountsFile
from tests.fake_kimi import FakeKimi
from tests.harness import LOOPBACK_DNS, REPO_ROOT, Proxy, start_mitmdump

ADDON_SCRIPT = REPO_ROOT / "kimi_rotator_addon.py"
_counter = itertools.count()


def fake_key(label: str | int) -> str:
    """An obviously fake key of the real shape: sk-kimi- plus 32 characters."""
    return f"sk-kimi-FAKE{str(label):0>28}"[:40]


@functools.cache
def addon_option_types() -> dict[str, object]:
    """The options the addon declares, name -> type, read from its ``load`` hook."""
    from rotator.addon import KimiRotator

    found: dict[str, object] = {}

    class _Loader:
        def add_option(self, name, typespec, default, help, choices=None):  # noqa: A002
            found[name] = typespec

        def add_command(self, *args, **kwargs):
            pass

    KimiRotator().load(_Loader())
    return found


def _split_float_options(opts: dict[str, str]) -> dict[str, float]:
    """Take the options declared as ``float`` out of ``opts`` (for config.yaml).

    mitmproxy's ``--set`` parses only str/int/bool/Optional/Sequence options: a float
    option given with ``--set`` makes mitmdump exit ("Unsupported option type").
    Its config.yaml holds typed values, so floats go there. (Values that are not
    numbers stay on the command line, for mitmdump to reject.)
    """
    types = addon_option_types()
    moved: dict[str, float] = {}
    for name in [n for n in opts if types.get(n) is float]:
        try:
            moved[name] = float(opts[name])
        except ValueError:
            continue
        del opts[name]
    return moved


@pytest.fixture
def fake_kimi() -> Iterator[FakeKimi]:
    with FakeKimi() as server:
        yield server


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
    Options the addon declares as float go into the run's config.yaml, not --set.
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
        opts = {"kimi_accounts": str(accounts_path), "kimi_flush_interval": "0.2"}
        addons: list[Path] = [ADDON_SCRIPT, *extra_addons]
        if mode == "reverse":
            mitm_mode: str | None = f"reverse:{fake.url}"
            opts["kimi_hosts"] = "127.0.0.1"
        else:
            mitm_mode = None
            addons.append(LOOPBACK_DNS)
            opts["loopback_dns_port"] = str(fake.port)
        opts.update(options or {})
        confdir = tmp_path / f"mitm{next(_counter)}"
        typed = _split_float_options(opts)
        if typed:
            confdir.mkdir(parents=True, exist_ok=True)
            (confdir / "config.yaml").write_text(
                "".join(f"{name}: {json.dumps(value)}\n" for name, value in typed.items())
            )
        proxy = start_mitmdump(
            addons=addons,
            mode=mitm_mode,
            options=opts,
            env=env,
            confdir=confdir,
            extra_args=extra_args,
        )
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
