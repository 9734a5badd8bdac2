"""A client of a running mitmdump, as the end-to-end tests talk to it: an httpx client
that ignores the environment's proxies, the agent's request (``send``), the deadlines a
proxy gets to save, and what the fake Kimi saw of one key."""

from __future__ import annotations

import httpx

from rotator.store.redis_store import RedisStore
from testbed.fake_kimi import MESSAGES_PATH, FakeKimi, SeenRequest
from testbed.processes import Proxy

MSG = {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
PLACEHOLDER = "sk-kimi-placeholder"
CLIENT_HEADERS = {
    "x-api-key": PLACEHOLDER,
    "User-Agent": "claude-cli/2.0.14 (external, cli)",
    "anthropic-version": "2023-06-01",
}
# Generous: other test suites share this 2-core machine.
FILE_DEADLINE_S = 10.0  # for a proxy's save to reach the accounts file
FLUSH_DEADLINE_S = 10.0  # for a proxy's counts to reach Redis
CLIENT_TIMEOUT_S = 30.0


def client() -> httpx.Client:
    # trust_env=False: never pick up a proxy from the environment.
    return httpx.Client(trust_env=False, timeout=CLIENT_TIMEOUT_S)


def send(c: httpx.Client, proxy: Proxy, *, stream: bool = False) -> httpx.Response:
    body = {**MSG, "stream": True} if stream else MSG
    return c.post(proxy.url + MESSAGES_PATH, json=body, headers=CLIENT_HEADERS)


def messages_by(fake: FakeKimi, key: str) -> list[SeenRequest]:
    return [r for r in fake.message_requests() if r.key == key]


def counts_in_redis(url: str, keys: list[str]) -> dict[str, tuple[int, int]]:
    """(totalRequests, successfulRequests) per key as the team store holds them now."""
    by_key = {a.key: (a.total_requests, a.successful_requests) for a in RedisStore(url).read().accounts}
    return {k: by_key.get(k, (0, 0)) for k in keys}
