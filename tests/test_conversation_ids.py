"""Which conversation a request names (rotator.conversations.ids): the headers the real
clients send, the body fields found by a byte search, and bodies that try to fool it."""

from __future__ import annotations

import json
import random

import pytest
from mitmproxy import http

from rotator.conversations import ids
from rotator.conversations.ids import Conversation, conversation_of, id_in_body
from rotator.proxy.addon import conversation_in
from tests.support.agents import (
    CLAUDE_SESSION, CLAUDE_UA, KIMI_SESSION, KIMI_UA, OPENCODE_SESSION, OPENCODE_UA, TRICKY_TEXT, TOOLS,
    kimi_cli_body, messages,
)

def claude_user_id(session: str) -> str:
    return json.dumps({"device_id": "f" * 64, "account_uuid": "", "session_id": session})


def claude_body(user_id: str | None = None, **extra: object) -> bytes:
    """Claude Code's shape (Anthropic messages): metadata after messages and tools."""
    doc = {"model": "kimi-for-coding", "messages": messages(3), "system": [{"type": "text", "text": "You are"}],
           "tools": TOOLS, "metadata": {"user_id": claude_user_id(CLAUDE_SESSION) if user_id is None else user_id},
           "max_tokens": 32000, "stream": True, **extra}
    return json.dumps(doc, separators=(",", ":")).encode()


def headers(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    base = [("host", "api.kimi.com"), ("content-type", "application/json"), ("accept", "application/json")]
    return [(n.encode(), v.encode("utf-8")) for n, v in (*base, *pairs)]


# -- headers --------------------------------------------------------------------------

def test_claude_code_header_names_the_conversation() -> None:
    got = conversation_of(headers(("User-Agent", CLAUDE_UA.decode()), ("X-Claude-Code-Session-Id", CLAUDE_SESSION)),
                          claude_body())
    assert got == Conversation(CLAUDE_SESSION, "x-claude-code-session-id", ids.CLAUDE_CODE)


def test_opencode_headers_name_the_conversation() -> None:
    got = conversation_of(headers(("user-agent", OPENCODE_UA.decode()), ("x-session-affinity", OPENCODE_SESSION),
                                  ("x-session-id", OPENCODE_SESSION)), b"{}")
    assert got == Conversation(OPENCODE_SESSION, "x-session-affinity", ids.OPENCODE)


@pytest.mark.parametrize("present, expected", [
    (["x-claude-code-session-id", "x-session-affinity", "x-session-id", "session-id"], "x-claude-code-session-id"),
    (["session-id", "x-session-id", "x-session-affinity"], "x-session-affinity"),
    (["session-id", "x-session-id"], "x-session-id"),
    (["session-id"], "session-id"),
])
def test_headers_are_believed_in_order_whatever_order_they_come_in(present: list[str], expected: str) -> None:
    got = conversation_of(headers(*[(name.upper(), f"id-of-{name}") for name in present]), None)
    assert got is not None and got.id == f"id-of-{expected}" and got.source == expected


def test_an_empty_header_is_passed_over_and_a_header_beats_the_body() -> None:
    got = conversation_of(headers(("X-Claude-Code-Session-Id", "  "), ("Session-Id", "s-1")), kimi_cli_body())
    assert got is not None and (got.id, got.source) == ("s-1", "session-id")


def test_the_first_of_a_repeated_header_counts() -> None:
    got = conversation_of(headers(("x-session-id", "first"), ("x-session-id", "second")), None)
    assert got is not None and got.id == "first"


@pytest.mark.parametrize("encoding", ["Content-Encoding", "CONTENT-ENCODING", "content-encoding"])
def test_an_encoded_body_is_not_read_whatever_the_names_case(encoding: str) -> None:
    # Names are skipped by length before they are lowered: every case of the ones read is still read.
    plain = [("User-Agent", KIMI_UA.decode()), ("Content-Length", "10"), ("x-session-i", "not-a-name")]
    got = conversation_of(headers(*plain), kimi_cli_body())
    assert got is not None and (got.id, got.client) == (KIMI_SESSION, "kimi-cli")
    assert conversation_of(headers(*plain, (encoding, "gzip")), kimi_cli_body()) is None


def test_a_remembered_user_id_gives_the_same_session_and_the_memo_stays_bounded(monkeypatch) -> None:
    monkeypatch.setattr(ids, "_session_memo", {})
    body = claude_body()
    assert id_in_body(body) == id_in_body(body) == (CLAUDE_SESSION, ids.BODY_METADATA_USER_ID)
    for i in range(ids.MEMO_SIZE + 5):
        assert id_in_body(claude_body(user_id=claude_user_id(f"s-{i}"))) == (f"s-{i}", ids.BODY_METADATA_USER_ID)
    assert len(ids._session_memo) == ids.MEMO_SIZE and claude_user_id(CLAUDE_SESSION) not in ids._session_memo
    assert id_in_body(body) == (CLAUDE_SESSION, ids.BODY_METADATA_USER_ID)  # forgotten, read again
    long = claude_user_id("s-long") + " " * ids.MEMO_KEY_MOST
    assert id_in_body(claude_body(user_id=long)) == ("s-long", ids.BODY_METADATA_USER_ID)
    assert long not in ids._session_memo
    assert id_in_body(claude_body(user_id="no session here")) is None
    assert "no session here" not in ids._session_memo


def test_no_header_and_no_field_is_no_conversation() -> None:
    plain = json.dumps({"model": "m", "messages": messages(2), "stream": True}).encode()
    assert conversation_of(headers(("user-agent", "python-httpx/0.27")), plain) is None
    assert conversation_of(headers(), None) is None
    assert conversation_of(headers(), b"") is None
    assert conversation_of([], b"not json at all") is None


@pytest.mark.parametrize("agent, kind", [
    (CLAUDE_UA, ids.CLAUDE_CODE), (b"Claude-Code/2.1", ids.CLAUDE_CODE), (OPENCODE_UA, ids.OPENCODE),
    (KIMI_UA, ids.KIMI_CLI), (b"kimi-cli/1.0", ids.KIMI_CLI), (b"python-httpx/0.27.0", ids.OTHER), (b"", ids.OTHER),
])
def test_client_kind_from_user_agent(agent: bytes, kind: str) -> None:
    assert ids.client_of(agent) == kind


# -- the id is short printable ASCII ----------------------------------------------------

@pytest.mark.parametrize("raw", [
    "é" * 10, "a b", "x" * (ids.MAX_ID_LENGTH + 1), "tab\there", "esc\x1b[31m", "sk-kimi-" + "Q" * 40, "key sk-abcdefgh1",
])
def test_odd_ids_are_hashed_to_a_short_printable_stable_id(raw: str) -> None:
    got = conversation_of(headers(("Session-Id", raw)), None)
    assert got is not None
    assert got.id.startswith(ids.HASH_PREFIX) and len(got.id) == len(ids.HASH_PREFIX) + 24
    assert got.id.isascii() and got.id.isprintable() and "sk-" not in got.id
    assert conversation_of(headers(("Session-Id", raw)), None) == got  # the same conversation every turn


def test_a_plain_id_of_the_bound_is_kept_as_is() -> None:
    raw = "a" * ids.MAX_ID_LENGTH
    assert ids.clean_id(raw.encode()) == raw
    assert ids.clean_id(b"  padded  ") == "padded"


# -- the body ---------------------------------------------------------------------------

@pytest.mark.parametrize("compact", [True, False])
def test_kimi_cli_prompt_cache_key_names_the_conversation(compact: bool) -> None:
    got = conversation_of(headers(("User-Agent", KIMI_UA.decode())), kimi_cli_body(compact=compact))
    assert got == Conversation(KIMI_SESSION, ids.BODY_PROMPT_CACHE_KEY, ids.KIMI_CLI)


def test_whitespace_around_the_colon_and_indented_bodies() -> None:
    spaced = kimi_cli_body().replace(b'"prompt_cache_key":', b'"prompt_cache_key" \r\n\t: \n ')
    assert id_in_body(spaced) == (KIMI_SESSION, ids.BODY_PROMPT_CACHE_KEY)
    indented = json.dumps(json.loads(kimi_cli_body()), indent=2).encode()
    assert id_in_body(indented) == (KIMI_SESSION, ids.BODY_PROMPT_CACHE_KEY)


def test_claude_code_metadata_user_id_is_the_fallback_and_agrees_with_the_header() -> None:
    body = claude_body()
    from_body = conversation_of(headers(("User-Agent", CLAUDE_UA.decode())), body)
    from_header = conversation_of(headers(("User-Agent", CLAUDE_UA.decode()),
                                          ("X-Claude-Code-Session-Id", CLAUDE_SESSION)), body)
    assert from_body == Conversation(CLAUDE_SESSION, ids.BODY_METADATA_USER_ID, ids.CLAUDE_CODE)
    assert from_header is not None and from_header.id == from_body.id  # one conversation, either way


def test_older_claude_code_user_id_form() -> None:
    legacy = f"user_{'a' * 64}_account__session_{CLAUDE_SESSION}"
    assert id_in_body(claude_body(user_id=legacy)) == (CLAUDE_SESSION, ids.BODY_METADATA_USER_ID)


@pytest.mark.parametrize("user_id", ["", "user_abc", json.dumps({"device_id": "d"}), "{not json",
                                     json.dumps({"session_id": 5}), json.dumps({"session_id": " "})])
def test_metadata_without_a_session_names_no_conversation(user_id: str) -> None:
    # a user or device id alone would put every conversation of a person on one key
    assert id_in_body(claude_body(user_id=user_id)) is None


def test_field_names_inside_messages_are_text_not_fields() -> None:
    # TRICKY_TEXT holds both fields, as text, in every message; the top level holds neither
    body = json.dumps({"model": "m", "messages": messages(5), "tools": TOOLS}).encode()
    assert b'"prompt_cache_key\\": \\"evil-1\\"' in body  # what the text looks like in the body
    assert id_in_body(body) is None


def test_text_after_the_field_holding_the_field_name_does_not_hide_it() -> None:
    body = kimi_cli_body(zz_note=TRICKY_TEXT * 3)  # a later string with the name and brackets
    assert id_in_body(body) == (KIMI_SESSION, ids.BODY_PROMPT_CACHE_KEY)


def test_a_nested_key_of_the_same_name_is_not_the_field() -> None:
    nested = {"type": "object", "properties": {"prompt_cache_key": "nested-1"},
              "deeper": [{"prompt_cache_key": "nested-2"}]}
    with_top = kimi_cli_body(zz_schema=nested)  # nested ones after the real one
    assert id_in_body(with_top) == (KIMI_SESSION, ids.BODY_PROMPT_CACHE_KEY)
    only_nested = json.dumps({"messages": messages(1), "zz_schema": nested}).encode()
    assert id_in_body(only_nested) is None
    metadata_nested = json.dumps({"messages": [{"role": "user", "content": "hi",
                                                "metadata": {"user_id": claude_user_id("nested")}}]}).encode()
    assert id_in_body(metadata_nested) is None


def test_a_name_ending_a_string_after_an_escaped_quote_is_not_the_field() -> None:
    # the key `a "prompt_cache_key` is top-level and followed by a colon, but its quote is escaped
    body = json.dumps({"messages": [], 'a "prompt_cache_key': "evil"}).encode()
    assert b'\\"prompt_cache_key": "evil"' in body
    assert id_in_body(body) is None
    backslashes = json.dumps({"messages": [], 'a \\': 1, "prompt_cache_key": "real"}).encode()
    assert id_in_body(backslashes) == ("real", ids.BODY_PROMPT_CACHE_KEY)


def test_more_decoys_than_candidates_give_up_rather_than_scan_on() -> None:
    decoys = {f"d{i}": {"prompt_cache_key": f"nested-{i}"} for i in range(ids.MAX_CANDIDATES)}
    body = kimi_cli_body(zz=decoys)
    assert id_in_body(body) is None  # the documented limit: per request, as without an id
    fewer = {f"d{i}": {"prompt_cache_key": f"nested-{i}"} for i in range(ids.MAX_CANDIDATES - 1)}
    assert id_in_body(kimi_cli_body(zz=fewer)) == (KIMI_SESSION, ids.BODY_PROMPT_CACHE_KEY)


def test_a_key_followed_by_more_than_the_bound_is_not_read() -> None:
    def body(after: int) -> bytes:
        head = b'{"messages":[],"prompt_cache_key":"early","tools":"'
        return head + b"t" * (after - len(b'"early","tools":"') - len(b'"}') - len(b":")) + b'"}'

    within, beyond = body(ids.MAX_TAIL), body(ids.MAX_TAIL + 1)
    assert len(within) - within.index(b'"prompt_cache_key"') - len(b'"prompt_cache_key"') == ids.MAX_TAIL
    assert id_in_body(within) == ("early", ids.BODY_PROMPT_CACHE_KEY)
    assert id_in_body(beyond) is None  # per request, as without an id: no 1 ms scans


def test_duplicate_top_level_keys_the_last_wins_as_in_a_json_parser() -> None:
    body = b'{"prompt_cache_key":"first","messages":[],"prompt_cache_key":"last"}'
    assert json.loads(body)["prompt_cache_key"] == "last"
    assert id_in_body(body) == ("last", ids.BODY_PROMPT_CACHE_KEY)


@pytest.mark.parametrize("value, expected", [
    (None, None), (5, None), ("", None), (["a"], None), ({"a": 1}, None),
    ("x" * (ids.MAX_STRING_VALUE + 1), None),
    ("with \"quote\" and \\", "h:"), ("caf\u00e9", "h:"), ("\ud800", "h:"), ("plain-1", "plain-1"),
])
def test_odd_values(value: object, expected: str | None) -> None:
    body = json.dumps({"messages": [], "prompt_cache_key": value}).encode("utf-8", "surrogatepass")
    got = id_in_body(body)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got[0].startswith(expected) and got[0].isascii() and got[0].isprintable()


@pytest.mark.parametrize("body", [
    b'{"messages":[],"prompt_cache_key":"cut', b'{"messages":[],"prompt_cache_key":"x"',  # cut short
    b'{"messages":[],"prompt_cache_key":', b'"prompt_cache_key":"x"}}}', b'\xff\xfe"prompt_cache_key"\x00',
    b'{"messages":[],"metadata":{"user_id":"' + b"a" * 5000 + b'"}}',  # metadata beyond its window
    b'{"metadata":"not an object"}', b'{"metadata":{"user_id":"{\\"session_id\\":\\"s\\"}"', b"\"" * 1000,
])
def test_broken_bodies_name_no_conversation_and_raise_nothing(body: bytes) -> None:
    assert id_in_body(body) is None


# -- against a real JSON parser ----------------------------------------------------------

def random_json(rng: random.Random, depth: int) -> object:
    """Nested JSON with the field names, quotes, backslashes and brackets in strings and keys."""
    words = ["prompt_cache_key", '"prompt_cache_key":"w"', "metadata", "}", "]", "{[", "\\", '\\"', '"', "é", "a b"]
    kind = rng.randrange(6 if depth < 4 else 3)
    if kind == 0:
        return "".join(rng.choice(words) for _ in range(rng.randrange(4)))
    if kind == 1:
        return rng.choice([1, 2.5, True, None])
    if kind == 2:
        return rng.choice(words)
    if kind == 3:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["content", "prompt_cache_key", "metadata", 'x "prompt_cache_key', "a\\", "}"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_a_full_parse_on_random_bodies(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        doc: dict[str, object] = {"messages": random_json(rng, 1)}
        if rng.random() < 0.5:
            doc["prompt_cache_key"] = rng.choice([f"s-{rng.randrange(10**6)}", 7, None, "é"])
        doc["after"] = random_json(rng, 2)
        separators = rng.choice([(",", ":"), (", ", ": "), (",", " : ")])
        body = json.dumps(doc, separators=separators, ensure_ascii=rng.random() < 0.5).encode()
        parsed = json.loads(body).get("prompt_cache_key")
        nested = body.count(b'"prompt_cache_key"') - 1
        ids.forget_depths()
        got = ids.top_level_value(body, b'"prompt_cache_key"')
        assert ids.top_level_value(body, b'"prompt_cache_key"') == got  # the depth count remembered
        if "prompt_cache_key" in doc and nested < ids.MAX_CANDIDATES:
            assert got is not None, body
            value = json.JSONDecoder().raw_decode(body[got:].decode())[0]
            assert value == parsed, body
        elif "prompt_cache_key" not in doc:
            assert got is None, body


def test_remembered_depth_counts_stay_bounded() -> None:
    ids.forget_depths()
    for i in range(ids.DEPTH_MEMO_SIZE + 50):
        assert id_in_body(b'{"messages":[],"prompt_cache_key":"s-%d"}' % i) == (f"s-{i}", ids.BODY_PROMPT_CACHE_KEY)
    assert len(ids._depth_memo) == ids.DEPTH_MEMO_SIZE
    assert id_in_body(b'{"messages":[],"prompt_cache_key":"s-0"}') == ("s-0", ids.BODY_PROMPT_CACHE_KEY)


def test_ids_and_clients_read_again_are_the_same_and_what_is_remembered_stays_bounded() -> None:
    for _ in range(2):  # the second time from what was remembered
        assert ids.clean_id(b" 9f1c2d3e ") == "9f1c2d3e"
        assert ids.clean_id(b"sk-kimi-" + b"a" * 40).startswith(ids.HASH_PREFIX)
        assert ids.clean_id(b"x" * 1000) == ids.clean_id(b"x" * 1000).strip()
        assert ids.client_of(b"claude-cli/2.1.332 (external, cli)") == ids.CLAUDE_CODE
        assert ids.client_of(b"") == ids.OTHER
    for i in range(3 * ids.MEMO_SIZE):
        assert ids.clean_id(f"conv-{i}".encode()) == f"conv-{i}"
        assert ids.client_of(f"KimiCLI/{i}".encode()) == ids.KIMI_CLI
    assert len(ids._clean_memo) <= ids.MEMO_SIZE and len(ids._client_memo) <= ids.MEMO_SIZE


# -- which body field first: the request's own API's ------------------------------------

def test_each_api_reads_its_own_body_field_first() -> None:
    # No client sends both; should one, its API's own field names the conversation.
    both = claude_body(prompt_cache_key=KIMI_SESSION)
    assert id_in_body(both) == (KIMI_SESSION, ids.BODY_PROMPT_CACHE_KEY)
    assert id_in_body(both, messages_api=True) == (CLAUDE_SESSION, ids.BODY_METADATA_USER_ID)
    # the other field still counts when the first is absent, on either API
    assert id_in_body(kimi_cli_body(), messages_api=True) == (KIMI_SESSION, ids.BODY_PROMPT_CACHE_KEY)
    assert id_in_body(claude_body()) == (CLAUDE_SESSION, ids.BODY_METADATA_USER_ID)
    # a first field that names nothing ends the search, on either API
    assert id_in_body(claude_body(user_id="user_abc", prompt_cache_key=KIMI_SESSION), messages_api=True) is None
    assert id_in_body(kimi_cli_body(session=""), messages_api=False) is None


@pytest.mark.parametrize(("path", "expected"), [
    ("/coding/v1/messages", (CLAUDE_SESSION, ids.BODY_METADATA_USER_ID)),
    ("/coding/v1/messages?beta=true", (CLAUDE_SESSION, ids.BODY_METADATA_USER_ID)),
    ("/coding/v1/chat/completions", (KIMI_SESSION, ids.BODY_PROMPT_CACHE_KEY)),
])
def test_the_proxy_tells_the_api_by_the_requests_path(path: str, expected: tuple[str, str]) -> None:
    request = http.Request.make("POST", f"https://api.kimi.com{path}", claude_body(prompt_cache_key=KIMI_SESSION),
                                {"content-type": "application/json"})
    got = conversation_in(request, streamed=False)
    assert got is not None and (got.id, got.source) == expected
