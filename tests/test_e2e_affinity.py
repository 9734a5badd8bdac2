"""End to end: conversation affinity (issue 25) through a real mitmdump in front of the
fake Kimi, with the real clients' ways of naming a conversation (Claude Code's header and
metadata.user_id, OpenCode's headers, Kimi CLI's prompt_cache_key on chat/completions)."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest

from testbed.fake_kimi import CHAT_COMPLETIONS_PATH, MESSAGES_PATH, FakeKimi
from testbed.processes import Proxy

CLAUDE_UA = "claude-cli/2.1.332 (external, cli)"
OPENCODE_UA = "opencode/1.18.33 ai-sdk/provider-utils/3.0.9 runtime/bun/1.2.21"
KIMI_UA = "KimiCLI/1.51.0"
KEY = {"x-api-key": "sk-kimi-placeholder"}


def history(turn: int) -> list[dict]:
    """A conversation as it grows: every turn resends everything so far."""
    out: list[dict] = []
    for i in range(turn + 1):
        out.append({"role": "user", "content": f"turn {i}: " + "x" * 2000})
        if i < turn:
            out.append({"role": "assistant", "content": f"answer {i}"})
    return out


def claude_code(c: httpx.Client, base: str, session: str, turn: int) -> httpx.Response:
    body = {"model": "kimi-for-coding", "max_tokens": 16, "messages": history(turn),
            "metadata": {"user_id": json.dumps({"device_id": "f" * 64, "account_uuid": "", "session_id": session})}}
    headers = {**KEY, "User-Agent": CLAUDE_UA, "X-Claude-Code-Session-Id": session}
    return c.post(base + MESSAGES_PATH, json=body, headers=headers)


def opencode(c: httpx.Client, base: str, session: str, turn: int) -> httpx.Response:
    body = {"model": "kimi-for-coding", "max_tokens": 16, "messages": history(turn)}
    headers = {**KEY, "User-Agent": OPENCODE_UA, "x-session-affinity": session, "x-session-id": session}
    return c.post(base + MESSAGES_PATH, json=body, headers=headers)


def kimi_cli(c: httpx.Client, base: str, session: str, turn: int) -> httpx.Response:
    body = {"messages": history(turn), "model": "kimi-for-coding", "prompt_cache_key": session,
            "stream": False, "tools": [{"type": "function", "function": {"name": "shell"}}]}
    headers = {"Authorization": "Bearer sk-kimi-placeholder", "User-Agent": KIMI_UA}
    return c.post(base + CHAT_COMPLETIONS_PATH, json=body, headers=headers)


CLIENTS = [claude_code, opencode, kimi_cli]


def session_of(client_index: int, n: int) -> str:
    return ("0b7c6a1e-59f4-4b8e-9a51-2f8d3c1e7a9", "ses_5f1d2c3b4a5e6f7a8b9c0d1e2", "d3b07384-d9a0-4c9b-8e2f-5a1b2c3d4e5")[
        client_index
    ] + str(n)


def plain(c: httpx.Client, base: str) -> httpx.Response:
    body = {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    return c.post(base + MESSAGES_PATH, json=body, headers={**KEY, "User-Agent": "python-httpx/0.27"})


def http_client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10)


def last_key(fake: FakeKimi) -> str | None:
    return fake.requests[-1].key


@pytest.mark.parametrize("strategy", ["health-based", "round-robin"])
def test_six_conversations_of_five_turns_stay_each_on_one_key_two_per_key(
    strategy, fake_kimi, keys, write_accounts, start_proxy
):
    write_accounts(keys, strategy)
    proxy: Proxy = start_proxy(fake_kimi)
    where: dict[str, list[str | None]] = {}
    with http_client() as c:
        for turn in range(5):
            # Turns come in another order each round, as parallel agents' do (in one
            # fixed order, round-robin alone would hand conversation n key n % 3).
            for n in (range(6) if turn % 2 == 0 else (5, 3, 1, 0, 4, 2)):
                ask = CLIENTS[n % 3]
                session = session_of(n % 3, n)
                answer = ask(c, proxy.url, session, turn)
                assert answer.status_code == 200, proxy.output()
                where.setdefault(session, []).append(last_key(fake_kimi))
    assert all(len(set(served)) == 1 for served in where.values()), where
    per_key = Counter(served[0] for served in where.values())
    assert sorted(per_key.values()) == [2, 2, 2], per_key
    assert len(fake_kimi.requests) == 30  # nothing refused, nothing retried


def test_a_conversation_whose_key_refuses_moves_once_and_stays(fake_kimi, keys, write_accounts, start_proxy):
    write_accounts(keys, "round-robin")  # alone, it would send each turn to another key
    proxy = start_proxy(fake_kimi)
    session = "0b7c6a1e-59f4-4b8e-9a51-2f8d3c1e7a90"
    with http_client() as c:
        assert claude_code(c, proxy.url, session, 0).status_code == 200
        first = last_key(fake_kimi)
        assert first is not None
        fake_kimi.set_kimi_error(first, "too_many_requests", headers={"retry-after": "1"})
        moved = claude_code(c, proxy.url, session, 1)
        assert moved.status_code == 200, proxy.output()  # the client never saw the refusal
        second = last_key(fake_kimi)
        assert second != first
        fake_kimi.clear_responses(first)  # the first key serves again: no bounce back
        later = []
        for turn in range(2, 6):
            assert claude_code(c, proxy.url, session, turn).status_code == 200
            later.append(last_key(fake_kimi))
    assert later == [second] * 4


def test_a_body_naming_both_fields_is_read_by_its_own_apis_field(fake_kimi, keys, write_accounts, start_proxy):
    # No client sends both; should one, Anthropic's Messages API goes by metadata.user_id
    # (two conversations here, on two keys), chat completions by prompt_cache_key (one).
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi)

    def body(session: str, turn: int) -> dict:
        return {"model": "kimi-for-coding", "max_tokens": 16, "messages": history(turn), "prompt_cache_key": "shared",
                "metadata": {"user_id": json.dumps({"device_id": "f" * 64, "session_id": session})}}

    served: dict[tuple[str, str], list[str | None]] = {}
    with http_client() as c:
        for path in (MESSAGES_PATH, CHAT_COMPLETIONS_PATH):
            for turn in range(3):
                for session in ("m-1", "m-2"):
                    answer = c.post(proxy.url + path, json=body(session, turn), headers={**KEY, "User-Agent": "agent/1"})
                    assert answer.status_code == 200, proxy.output()
                    served.setdefault((path, session), []).append(last_key(fake_kimi))
    on_messages = [served[MESSAGES_PATH, s] for s in ("m-1", "m-2")]
    assert all(len(set(keys_of)) == 1 for keys_of in on_messages), served
    assert on_messages[0][0] != on_messages[1][0], served  # two conversations, spread
    on_chat = served[CHAT_COMPLETIONS_PATH, "m-1"] + served[CHAT_COMPLETIONS_PATH, "m-2"]
    assert len(set(on_chat)) == 1, served  # one conversation: "shared"


def test_requests_naming_no_conversation_still_alternate_under_round_robin(
    fake_kimi, keys, write_accounts, start_proxy
):
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi)
    with http_client() as c:
        for n in range(2):  # conversations live meanwhile change nothing for the rest
            assert claude_code(c, proxy.url, session_of(0, n), 0).status_code == 200
        before = len(fake_kimi.requests)
        for _ in range(6):
            assert plain(c, proxy.url).status_code == 200
    served = [keys.index(r.key) for r in fake_kimi.requests[before:]]
    assert served in ([0, 1, 2, 0, 1, 2], [1, 2, 0, 1, 2, 0], [2, 0, 1, 2, 0, 1])


def test_with_affinity_off_every_turn_follows_the_strategy(fake_kimi, keys, write_accounts, start_proxy):
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi, options={"kimi_affinity": "false"})
    with http_client() as c:
        for turn in range(6):
            assert claude_code(c, proxy.url, session_of(0, 0), turn).status_code == 200
    assert [keys.index(r.key) for r in fake_kimi.requests] == [0, 1, 2, 0, 1, 2]


def test_two_proxies_of_a_team_share_a_conversations_key_and_its_move(
    redis_server, fake_kimi, keys, start_proxy
):
    from rotator.admin import ops
    from rotator.store.redis_store import RedisStore

    store = RedisStore(redis_server.url)
    for i, key in enumerate(keys):
        ops.run(store, ops.add_key(key, f"K{i}", 1))
    store.close()
    a, b = (start_proxy(fake_kimi, options={"kimi_store": redis_server.url}) for _ in range(2))
    with http_client() as c:
        for n in range(3):  # proxy a spreads three conversations over the three keys
            assert claude_code(c, a.url, session_of(0, n), 0).status_code == 200, a.output()
        first = [r.key for r in fake_kimi.requests]
        assert len(set(first)) == 3
        # Their next turns come through proxy b, which has seen none of them: alone, it
        # would give each the key with the fewest of its own (none), the strategy's pick.
        for n in (2, 1, 0):
            assert claude_code(c, b.url, session_of(0, n), 1).status_code == 200, b.output()
        assert [r.key for r in fake_kimi.requests[3:]] == first[::-1]
        fake_kimi.set_kimi_error(first[2], "too_many_requests", headers={"retry-after": "1"})
        assert claude_code(c, b.url, session_of(0, 2), 2).status_code == 200  # moved by b
        moved_to = fake_kimi.requests[-1].key
        assert moved_to != first[2]
        fake_kimi.clear_responses(first[2])
        for turn in range(3, 5):  # and a follows the move
            assert claude_code(c, a.url, session_of(0, 2), turn).status_code == 200
            assert fake_kimi.requests[-1].key == moved_to
