"""The script mitmproxy loads with -s: its addon, and every other hook name bound to None
so that mitmproxy's look-up of each hook on the module finds a name (rotator.proxy.script_module)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mitmproxy import hooks
from mitmproxy.proxy.layers.http import HttpRequestHook
from mitmproxy.addons import script
from mitmproxy.test import taddons, tflow

from rotator.proxy.addon import KimiRotator
from rotator.proxy.script_module import hooks_as_none

ROOT = Path(__file__).resolve().parent.parent


def test_hook_names_not_defined_are_bound_to_none_and_defined_ones_kept() -> None:
    mine = object()
    namespace: dict[str, object] = {"addons": [mine], "request": mine}
    hooks_as_none(namespace)
    assert namespace["addons"] == [mine] and namespace["request"] is mine
    assert {name for name, value in namespace.items() if value is None} == set(hooks.all_hooks) - {"request", "add_log"}


@pytest.mark.parametrize("path", ["kimi_rotator_addon.py", "rotator/script/kimi_rotator_addon.py"])
def test_mitmproxy_finds_each_hook_on_the_script_and_calls_only_the_addons(path: str, caplog) -> None:
    with taddons.context() as tctx:
        module = script.load_script(str(ROOT / path))
        tctx.master.addons.register(module)  # as mitmproxy's script loader does
        assert module is not None
        (addon,) = module.addons
        assert isinstance(addon, KimiRotator)
        assert "request" in hooks.all_hooks and "responseheaders" in hooks.all_hooks
        for name in hooks.all_hooks.keys() - {"add_log"}:  # deprecated: mitmproxy warns of an addon with it
            assert name in vars(module), name  # found, not missed
        assert "deprecated" not in caplog.text
        event = HttpRequestHook(tflow.tflow())
        called = [owner for owner, _ in tctx.master.addons._iter_hooks(module, event)]
        assert called == [addon]  # the module's None is skipped like a missing hook
