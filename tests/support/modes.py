"""A running mitmdump reached in each of its modes, as tests/test_e2e_rotation.py drives
it: reverse (the proxy's own URL), regular (api.kimi.com through the proxy, plain HTTP)
and regular-tls (HTTPS through the proxy, its CA trusted); Kimi CLI's request headers and
the fake Kimi's stream, event by event."""

from __future__ import annotations

import ssl

import httpx

from testbed.processes import Proxy
from tests.support.e2e import MSG, PLACEHOLDER

__all__ = ["CLIENT_HEADERS", "FILE_DEADLINE_S", "MSG", "PLACEHOLDER", "STREAM_EVENTS", "USER_AGENT",
           "client", "kimi_base"]

USER_AGENT = "claude-cli/2.0.14 (external, cli)"
CLIENT_HEADERS = {"User-Agent": USER_AGENT, "X-Msh-Platform": "kimi_cli"}  # the key goes on per request
STREAM_EVENTS = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_delta",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]
FILE_DEADLINE_S = 2.0  # start_proxy's proxies save every 0.2 s


def kimi_base(proxy: Proxy, mode: str) -> str:
    return {
        "reverse": proxy.url,
        "regular": "http://api.kimi.com",
        "regular-tls": "https://api.kimi.com",
    }[mode]


def client(proxy: Proxy, mode: str) -> httpx.Client:
    # trust_env=False: never pick up a proxy from the environment.
    if mode == "reverse":
        return httpx.Client(trust_env=False, timeout=10)
    verify: ssl.SSLContext | bool = True
    if mode == "regular-tls":
        verify = ssl.create_default_context(cafile=str(proxy.ca_cert))
    return httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=10)
