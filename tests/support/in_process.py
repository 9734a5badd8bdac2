"""The addon in process: mitmproxy's taddons around a KimiRotator on a fake clock, and a
fake upstream that plays mitmproxy and Kimi for its flows (the ``proxy`` fixture in
tests/conftest.py puts the two together)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.test import taddons

from rotator.core.clock import SYSTEM_CLOCK, Clock
from rotator.core.models import Account
from rotator.proxy.addon import KimiRotator
from testbed.hooks import call_hook
from tests.support.accounts import write_pool

USAGES = "/coding/v1/usages"


@contextmanager
def addon_in_taddons(accounts: Path | None = None, *before: Any, clock: Clock = SYSTEM_CLOCK,
                     send: Any = None, **options: Any) -> Iterator[tuple[KimiRotator, taddons.context]]:
    """A KimiRotator in mitmproxy's taddons, configured: on `clock`, its own requests going
    to `send` (one with an `addon` attribute, as FakeUpstream, is told its addon), on the
    `accounts` file, with `options`. `before`: addons loaded ahead of it whose options a
    test sets (Proxyserver, ProxyAuth). The one way the tests put the addon in taddons."""
    addon = KimiRotator(clock=clock) if send is None else KimiRotator(clock=clock, send=send)
    if hasattr(send, "addon"):
        send.addon = addon
    if accounts is not None:
        options = {"kimi_accounts": str(accounts), **options}
    with taddons.context(*before, addon) as tctx:
        if options:
            tctx.configure(addon, **options)
        yield addon, tctx


def configure_with_keys(tctx: taddons.context, addon: KimiRotator, folder: Path, keys: list[str],
                        **options: Any) -> None:
    """Configure `addon` in `tctx` on a pool of `keys` (unnamed accounts) written in `folder`."""
    path = write_pool(folder / "accounts.json", [Account(key=k) for k in keys])
    tctx.configure(addon, kimi_accounts=str(path), **options)


def kimi_error(status: int, message: str, headers: dict[str, str] | None = None) -> http.Response:
    body = json.dumps({"type": "error", "error": {"type": "x", "message": message}})
    return http.Response.make(status, body, {"content-type": "application/json", **(headers or {})})


def success() -> http.Response:
    return http.Response.make(200, b'{"type":"message"}', {"content-type": "application/json"})


Answer = Callable[[http.HTTPFlow, str], "http.Response | Exception | None"]


class FakeUpstream:
    """Plays mitmproxy and Kimi for flows: runs the addon's hooks around an answer.

    `answer(flow, key)` gets each request with the full key it carried, and returns a
    response, an exception to raise after the key went on (a resend that blew up), or
    None to hang until cancelled (`cut` lists the keys of requests so ended).
    """

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.addon: KimiRotator | None = None
        self.seen: list[tuple[str, str]] = []  # (path, key) as upstream saw them
        self.cut: list[str] = []  # keys of the requests cancelled while they hung

    async def __call__(self, flow: http.HTTPFlow) -> None:
        addon = self.addon
        assert addon is not None
        await call_hook(addon, "request", flow)
        if flow.response is not None:
            return  # the proxy answered itself
        key = flow.request.headers.get("x-api-key") or flow.request.headers.get("authorization", "")
        key = key.removeprefix("Bearer ")
        self.seen.append((flow.request.path, key))
        result = self.answer(flow, key)
        if result is None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cut.append(key)
                raise
        if isinstance(result, Exception):
            raise result
        assert isinstance(result, http.Response)
        flow.response = result
        await call_hook(addon, "responseheaders", flow)
        await call_hook(addon, "response", flow)

    def keys_sent(self, path: str = "/coding/v1/messages") -> list[str]:
        return [key for seen_path, key in self.seen if seen_path == path]
