"""Token accounting wired into the proxy (issue 26), in process: what a success of either
shape reports in its `usage`, streamed (read chunk by chunk as it passes, gzip and
deflate included) or whole (JSON, or SSE held whole by a resend), lands on its key's
totals and today's, in the change record the next save merges, and at the end of the
flow's comment; an error and a stream in an unread coding count nothing."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from mitmproxy import http

from rotator.core import merge, stats
from rotator.core.models import Account, AccountsFile
from rotator.proxy.addon import KimiRotator
from rotator.proxy.token_reading import StreamReader, new_reader, reader_of
from rotator.store import file as storage
from rotator.tokens import Shape, Usage
from testbed.hooks import call_hook, kimi_flow
from tests.support.accounts import NOW, fake_keys
from tests.support.in_process import kimi_error

KEYS = fake_keys(2)
TODAY = stats.utc_day(NOW)
MESSAGES = "/coding/v1/messages"
CHAT = "/coding/v1/chat/completions"
SSE = {"content-type": "text/event-stream"}
JSON = {"content-type": "application/json"}


def anthropic_json(fresh: int, read: int, write: int, out: int) -> bytes:
    return json.dumps({"type": "message", "content": [{"type": "text", "text": "hi"}],
                       "usage": {"input_tokens": fresh, "cache_read_input_tokens": read,
                                 "cache_creation_input_tokens": write, "output_tokens": out}}).encode()


def openai_json(prompt: int, cached: int, out: int) -> bytes:
    return json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": {"content": "hi"}}],
                       "usage": {"prompt_tokens": prompt, "completion_tokens": out, "cached_tokens": cached}}).encode()


def anthropic_events(fresh: int, read: int, write: int, out: int) -> list[bytes]:
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": fresh, "cache_read_input_tokens": read, "cache_creation_input_tokens": write,
        "output_tokens": 1}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": out}}
    text = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello"}}
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in (start, text, text, delta)] + [
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n']


def openai_events(prompt: int, cached: int, out: int) -> list[bytes]:
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    last = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
            "usage": {"prompt_tokens": prompt, "completion_tokens": out, "cached_tokens": cached}}]}
    return [f"data: {json.dumps(c)}\n\n".encode() for c in (chunk, chunk, last)] + [b"data: [DONE]\n\n"]


@pytest.fixture
def addon(proxy) -> KimiRotator:
    """The addon in taddons on two keys; the tests call its hooks themselves."""
    return proxy(lambda flow, key: None, KEYS)[0]


async def sent(addon: KimiRotator, path: str) -> http.HTTPFlow:
    flow = kimi_flow()
    flow.request.path = path
    await call_hook(addon, "request", flow)
    assert flow.request.headers["x-api-key"] in KEYS
    return flow


async def answer_whole(addon: KimiRotator, flow: http.HTTPFlow, status: int, body: bytes,
                       headers: dict[str, str]) -> None:
    flow.response = http.Response.make(status, body, headers)
    await call_hook(addon, "responseheaders", flow)
    await call_hook(addon, "response", flow)


async def answer_streamed(addon: KimiRotator, flow: http.HTTPFlow, chunks: list[bytes],
                          headers: dict[str, str] = SSE, cut: bool = False) -> list[bytes]:
    """Plays mitmproxy's streaming: headers, the stream callable on each chunk then b"",
    then `response` (or `error` for a stream cut off). Returns what the client got."""
    flow.response = http.Response.make(200, b"", headers)
    await call_hook(addon, "responseheaders", flow)
    stream = flow.response.stream
    assert stream, "a success of SSE streams"
    passed = [stream(c) if callable(stream) else c for c in chunks]
    if cut:
        from mitmproxy.flow import Error
        flow.error = Error("connection closed")
        await call_hook(addon, "error", flow)
        return passed
    if callable(stream):
        assert stream(b"") == b""
    await call_hook(addon, "response", flow)
    return passed


def totals(addon: KimiRotator, key: str) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    account = addon.pool.account(key)
    assert account is not None
    return account.tokens, account.daily_tokens


def split_everywhere(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


ANTHROPIC_FIELDS = {"input": 100 + 4000 + 300, "output": 57, "cacheRead": 4000, "cacheWrite": 300}
OPENAI_FIELDS = {"input": 5000, "output": 42, "cacheRead": 3000}


@pytest.mark.parametrize("path, body, expected", [
    (MESSAGES, anthropic_json(100, 4000, 300, 57), ANTHROPIC_FIELDS),
    (CHAT, openai_json(5000, 3000, 42), OPENAI_FIELDS),
])
async def test_a_json_success_counts_its_usage_on_its_key(addon, path, body, expected):
    flow = await sent(addon, path)
    key = flow.request.headers["x-api-key"]  # masked once answered
    await answer_whole(addon, flow, 200, body, JSON)
    assert totals(addon, key) == (expected, {TODAY: expected})
    change = addon.pool.changes.keys[key].fields
    assert change["tokens"].value == expected and change["daily_tokens"].value == {TODAY: expected}
    assert flow.comment.endswith(" · in " + ("4.4k (cached 4.0k) · out 57" if path == MESSAGES
                                             else "5.0k (cached 3.0k) · out 42"))


async def test_a_gzipped_json_success_is_read(addon):
    flow = await sent(addon, MESSAGES)
    key = flow.request.headers["x-api-key"]
    flow.response = http.Response.make(200, b"", {**JSON, "content-encoding": "gzip"})
    flow.response.raw_content = gzip.compress(anthropic_json(100, 4000, 300, 57))
    await call_hook(addon, "responseheaders", flow)
    await call_hook(addon, "response", flow)
    assert totals(addon, key)[0] == ANTHROPIC_FIELDS


@pytest.mark.parametrize("size", [1, 7, 64, 100_000])
@pytest.mark.parametrize("path, events, expected", [
    (MESSAGES, anthropic_events(100, 4000, 300, 57), ANTHROPIC_FIELDS),
    (CHAT, openai_events(5000, 3000, 42), OPENAI_FIELDS),
])
async def test_a_streamed_success_is_read_as_it_passes_and_passed_unchanged(addon, size, path, events, expected):
    flow = await sent(addon, path)
    key = flow.request.headers["x-api-key"]
    chunks = split_everywhere(b"".join(events), size)
    passed = await answer_streamed(addon, flow, chunks)
    assert passed == chunks  # each chunk handed on at once, unchanged
    assert isinstance(reader_of(flow.response.stream), StreamReader)
    assert totals(addon, key) == (expected, {TODAY: expected})
    assert " · in " in flow.comment


@pytest.mark.parametrize("coding, compress", [
    ("gzip", lambda b: gzip.compress(b)),
    ("deflate", lambda b: zlib.compress(b)),
    ("deflate", lambda b: (lambda c: c.compress(b) + c.flush())(zlib.compressobj(wbits=-15))),
])
async def test_a_compressed_stream_is_decoded_to_be_read(addon, coding, compress):
    flow = await sent(addon, MESSAGES)
    key = flow.request.headers["x-api-key"]
    raw = compress(b"".join(anthropic_events(100, 4000, 300, 57)))
    chunks = split_everywhere(raw, 13)
    passed = await answer_streamed(addon, flow, chunks, {**SSE, "content-encoding": coding})
    assert passed == chunks  # still compressed: the client decodes it
    assert totals(addon, key)[0] == ANTHROPIC_FIELDS


async def test_a_stream_in_another_coding_streams_and_counts_nothing(addon, caplog):
    flow = await sent(addon, MESSAGES)
    key = flow.request.headers["x-api-key"]
    chunks = [b"\x1b\x00brotli-ish"]
    caplog.set_level("INFO")
    passed = await answer_streamed(addon, flow, chunks, {**SSE, "content-encoding": "br"})
    assert passed == chunks and flow.response.stream is True
    assert totals(addon, key) == ({}, {})
    assert "not read for tokens" in caplog.text


async def test_a_broken_gzip_stream_streams_on_and_counts_nothing(addon):
    flow = await sent(addon, MESSAGES)
    key = flow.request.headers["x-api-key"]
    chunks = [b"not gzip at all", b"more"]
    passed = await answer_streamed(addon, flow, chunks, {**SSE, "content-encoding": "gzip"})
    assert passed == chunks
    assert totals(addon, key) == ({}, {})


async def test_a_stream_cut_short_counts_what_it_said_so_far(addon):
    flow = await sent(addon, MESSAGES)
    key = flow.request.headers["x-api-key"]
    events = anthropic_events(100, 4000, 300, 57)
    await answer_streamed(addon, flow, events[:2], cut=True)  # message_start came, message_delta never
    assert totals(addon, key)[0] == {"input": 4400, "output": 1, "cacheRead": 4000, "cacheWrite": 300}
    assert addon.pool.account(key).successful_requests == 0


async def test_an_error_counts_no_tokens(addon):
    flow = await sent(addon, MESSAGES)
    key = flow.request.headers["x-api-key"]
    await answer_whole(addon, flow, 400, anthropic_json(100, 0, 0, 5), JSON)
    assert totals(addon, key) == ({}, {})
    assert "tokens" not in addon.pool.changes.keys.get(key, merge.KeyChange()).fields


async def test_an_answer_without_usage_counts_nothing_and_says_nothing(addon, caplog):
    flow = await sent(addon, "/coding/v1/models")
    key = flow.request.headers["x-api-key"]
    await answer_whole(addon, flow, 200, b'{"usage": {"input_tokens": 5, "output_tokens": 1}}', JSON)
    flow2 = await sent(addon, MESSAGES)
    key2 = flow2.request.headers["x-api-key"]
    await answer_whole(addon, flow2, 200, b'{"type": "message"}', JSON)
    assert totals(addon, key) == ({}, {}) and totals(addon, key2) == ({}, {})
    assert "in " not in flow2.comment.split("→")[-1]


async def test_answers_add_up_per_key_and_per_day(addon):
    for _ in range(3):
        flow = await sent(addon, MESSAGES)
        await answer_whole(addon, flow, 200, anthropic_json(10, 20, 30, 4), JSON)
    both = [addon.pool.account(k).tokens for k in KEYS]
    assert sum(b.get("input", 0) for b in both) == 180
    assert sum(b.get("output", 0) for b in both) == 12
    assert sum(addon.pool.account(k).daily_tokens.get(TODAY, {}).get("cacheRead", 0) for k in KEYS) == 60
    assert sum(c.fields["tokens"].value["cacheWrite"] for c in addon.pool.changes.keys.values()
               if "tokens" in c.fields) == 90


def test_the_stream_reader_hands_every_chunk_on_unchanged_even_when_reading_fails():
    reader = new_reader(Shape.ANTHROPIC, "gzip")
    assert reader(b"\x00garbage") == b"\x00garbage"
    assert reader(b"") == b""
    assert reader.result() is None
    plain = StreamReader(Shape.OPENAI)
    for chunk in openai_events(7, 0, 3):
        assert plain(chunk) is chunk
    plain(b"")
    assert plain.result() == Usage(7, 3, 0, 0)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_compressed_stream_whose_usage_event_spans_a_settle_still_counts(coding: str) -> None:
    # 256 small chunks make the reader settle with the usage event still open: the
    # scanner then reads on through its own steps, which a decoding reader must not shadow.
    wbits = 31 if coding == "gzip" else 15
    compress = zlib.compressobj(6, zlib.DEFLATED, wbits)
    event = b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":{"output_tokens":5}}\n\n'
    cut = event.index(b"output")
    pieces = [b": ping\n\n"] * 256 + [event[:cut], event[cut:]]
    reader = new_reader(Shape.ANTHROPIC, coding)
    for piece in pieces:
        sent = compress.compress(piece) + compress.flush(zlib.Z_SYNC_FLUSH)
        assert reader(sent) == sent
    reader(compress.flush())
    reader(b"")
    assert reader.fault is None
    assert reader.result() == Usage(0, 5, 0, 0)


def test_chunks_after_the_end_are_neither_read_nor_kept() -> None:
    reader = new_reader(Shape.OPENAI)
    for chunk in openai_events(7, 0, 3):
        reader(chunk)
    reader(b"")
    for _ in range(200):
        assert reader(b"x" * 500) == b"x" * 500
    assert reader.held_bytes == 0
    assert reader.result() == Usage(7, 3, 0, 0)


def test_two_proxies_changes_add_up_on_one_state_name_by_name_and_day_by_day():
    state = AccountsFile(accounts=[Account(key=KEYS[0], tokens={"input": 5}, daily_tokens={TODAY: {"input": 5}})])
    first, second, later = merge.PoolChange(), merge.PoolChange(), merge.PoolChange()
    merge.add_sums(first.for_key(KEYS[0]).sums("tokens", NOW), {"input": 10, "output": 2})
    merge.add_sums(first.for_key(KEYS[0]).sums_on_day("daily_tokens", TODAY, NOW), {"input": 10, "output": 2})
    merge.add_sums(second.for_key(KEYS[0]).sums("tokens", NOW), {"input": 7, "cacheRead": 3})
    merge.add_sums(second.for_key(KEYS[0]).sums_on_day("daily_tokens", "2027-01-14", NOW), {"input": 7})
    merge.add_sums(later.for_key(KEYS[0]).sums("tokens", NOW), {"input": 1})
    first.absorb(later)  # a failed save's changes, then newer ones
    merge.apply(state, first)
    merge.apply(state, second)
    account = state.accounts[0]
    assert account.tokens == {"input": 23, "output": 2, "cacheRead": 3}
    assert account.daily_tokens == {TODAY: {"input": 15, "output": 2}, "2027-01-14": {"input": 7}}
    assert later.keys[KEYS[0]].fields["tokens"].value == {"input": 1}  # absorbing copied it


def test_token_totals_are_saved_and_read_back_and_a_person_s_edit_does_not_undo_them(tmp_path):
    account = Account(key=KEYS[0], tokens={"input": 1}, edited_at={"tokens": NOW + 10})
    change = merge.KeyChange()
    merge.add_sums(change.sums("tokens", NOW), {"input": 2})
    merge.apply_to_account(account, change)
    assert account.tokens == {"input": 3}
    path = tmp_path / "a.json"
    storage.write_accounts(path, AccountsFile(accounts=[account]))
    on_disk = json.loads(path.read_text())["accounts"][0]
    assert on_disk["tokens"] == {"input": 3} and on_disk["dailyTokens"] == {}
    assert storage.read_accounts(path).accounts[0].tokens == {"input": 3}


async def test_a_resend_held_whole_as_sse_counts_on_the_key_that_answered(proxy):
    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        if key == KEYS[0]:
            return kimi_error(429, "rate limit reached", {"retry-after": "30"})
        return http.Response.make(200, b"".join(anthropic_events(100, 4000, 300, 57)), SSE)

    addon, upstream = proxy(answer, KEYS)
    flow = kimi_flow()
    await upstream(flow)
    assert upstream.keys_sent() == KEYS
    assert totals(addon, KEYS[0]) == ({}, {})
    assert totals(addon, KEYS[1])[0] == ANTHROPIC_FIELDS
    assert flow.comment.endswith(": ok · in 4.4k (cached 4.0k) · out 57"), flow.comment
    assert flow.metadata["kimi_rotator"]["attempts"][-1]["tokens"] == ANTHROPIC_FIELDS


def test_member_tokens_add_up_member_by_member_and_old_days_go():
    old_day = stats.utc_day(NOW - 100 * stats.DAY_MS)
    account = Account(key=KEYS[0], member_tokens={
        "alice@one": {TODAY: {"input": 1}, **{stats.utc_day(NOW - d * stats.DAY_MS): {"input": 1} for d in range(2, 92)}},
        "old@gone": {old_day: {"input": 5}}})
    first, second = merge.KeyChange(), merge.KeyChange()
    merge.add_sums(first.member_sums_on_day("member_tokens", "alice@one", TODAY, NOW), {"input": 2, "output": 1})
    merge.add_sums(second.member_sums_on_day("member_tokens", "bob@two", TODAY, NOW), {"input": 3})
    merge.add_sums(second.member_sums_on_day("member_tokens", "alice@one", TODAY, NOW), {"input": 4})
    first.absorb(second)
    merge.apply_to_account(account, first)
    assert account.member_tokens["alice@one"][TODAY] == {"input": 7, "output": 1}
    assert account.member_tokens["bob@two"] == {TODAY: {"input": 3}}
    alice = account.member_tokens["alice@one"]
    assert stats.utc_day(NOW - 91 * stats.DAY_MS) not in alice  # older than DAYS_KEPT: dropped
    assert stats.utc_day(NOW - 90 * stats.DAY_MS) in alice and len(alice) == stats.DAYS_KEPT
    assert second.fields["member_tokens"].value["alice@one"][TODAY] == {"input": 4}  # not shared


async def test_a_proxy_on_a_file_counts_no_member_tokens(addon):
    flow = await sent(addon, MESSAGES)
    key = flow.request.headers["x-api-key"]
    await answer_whole(addon, flow, 200, anthropic_json(1, 2, 3, 4), JSON)
    assert addon.pool.member is None and addon.pool.account(key).member_tokens == {}


def test_a_member_name_is_one_clean_short_line_or_user_at_host():
    import getpass
    import socket

    from rotator.proxy.options import MEMBER_MOST, member_name

    assert member_name("  alice@laptop ") == "alice@laptop"
    assert member_name("") == f"{getpass.getuser()}@{socket.gethostname()}"[:MEMBER_MOST]
    odd = member_name("eve\x1b[31m\nred" + "x" * 200)
    assert "\x1b" not in odd and "\n" not in odd and len(odd) <= MEMBER_MOST


async def test_each_conversation_adds_up_what_its_turns_spent(addon):
    """Issue 26 with issue 25: per live conversation its turns, tokens and cache share, as
    /status.json's sessions show them."""
    from rotator.status import document

    for turn in range(2):
        flow = kimi_flow()
        flow.request.path = MESSAGES
        flow.request.headers["x-claude-code-session-id"] = "conv-tokens-1"
        await call_hook(addon, "request", flow)
        await answer_whole(addon, flow, 200, anthropic_json(100, 4000, 300, 57), JSON)
    [session] = document.status_document(addon.status_page.snapshot())["sessions"]
    assert session["turns"] == 2
    assert session["tokens"] == {"input": 2 * 4400, "output": 2 * 57, "cacheRead": 2 * 4000}
    assert session["cacheShare"] == pytest.approx(4000 / 4400)


@pytest.mark.parametrize("fields", [
    [], [(b"Content-Encoding", b"gzip")], [(b"content-encoding", b" GZip ")], [(b"CONTENT-ENCODING", b"identity")],
    [(b"content-encoding", b"gzip"), (b"x-other", b"1"), (b"Content-Encoding", b"br")],
    [(b"content-type", b"text/event-stream"), (b"content-encodinG", b"")],
])
def test_the_content_coding_is_read_from_the_fields_as_headers_get_reads_it(fields):
    from rotator.proxy import bodies
    response = http.Response.make(200, b"")
    response.headers = http.Headers(fields)
    expected = response.headers.get("content-encoding", "").strip().lower()
    assert bodies.content_coding(response) == ("" if expected == "identity" else expected)
