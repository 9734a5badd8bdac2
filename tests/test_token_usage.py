"""The usage readers (rotator.tokens): what a whole JSON answer and a streamed one say
they spent, read the way Kimi writes it in both shapes, split anywhere, cut short,
missing, odd or hostile. In process: the streams are written by hand after the
references (Anthropic Messages SSE, Kimi's OpenAI-shape chunks)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable

import pytest

from rotator.tokens import MAX_TOKENS, Shape, Usage, UsageScanner, from_event_stream, from_json_answer, shape_for_path
from rotator.tokens.scan import MAX_EVENT_BYTES

A, O = Shape.ANTHROPIC, Shape.OPENAI


# -- recorded-style answers ------------------------------------------------------------

def sse(events: Iterable[tuple[str | None, object]], nl: str = "\n") -> bytes:
    """An SSE body: each (event name or None, data) as `event:` and `data:` lines and a
    blank line; data that is not a str is written as compact JSON."""
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        out.append((f"event: {name}{nl}" if name else "") + f"data: {text}{nl}{nl}")
    return "".join(out).encode()


def start_usage(input_tokens: object = 2107, read: object = 41000, write: object = 96, output: object = 1) -> dict:
    return {"input_tokens": input_tokens, "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read, "output_tokens": output}


def anthropic_events(text_deltas: Iterable[str] = ("Hello", ", world", "!"), usage: object | None = None,
                     output: object = 612, tool: bool = True) -> list[tuple[str | None, object]]:
    start = {"type": "message_start", "message": {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": "kimi-for-coding",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": start_usage() if usage is None else usage}}
    events: list[tuple[str | None, object]] = [
        ("message_start", start),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": t}}) for t in text_deltas]
    events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if tool:  # a tool named "usage", its input streamed as partial JSON naming usage too
        events += [
            ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "usage", "input": {}}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                "type": "input_json_delta", "partial_json": '{"usage": {"input_tokens": 5'}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                "type": "input_json_delta", "partial_json": "}}"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ]
    events += [
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": output}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


ANTHROPIC_EXPECTED = Usage(input=2107 + 41000 + 96, output=612, cache_read=41000, cache_write=96)


def chunk(content: str | None = None, finish: str | None = None, usage: object | None = None,
          **top: object) -> dict:
    choice: dict = {"index": 0, "delta": {} if content is None else {"content": content}, "finish_reason": finish}
    if usage is not None:
        choice["usage"] = usage
    return {"id": "chatcmpl-6f1c2a", "object": "chat.completion.chunk", "created": 1767225600,
            "model": "kimi-for-coding", "choices": [choice], **top}


KIMI_USAGE = {"prompt_tokens": 48200, "completion_tokens": 612, "total_tokens": 48812, "cached_tokens": 41000}
OPENAI_EXPECTED = Usage(input=48200, output=612, cache_read=41000, cache_write=0)


def kimi_events(usage: object | None = KIMI_USAGE, text: Iterable[str] = ("Hi", " there")) -> list:
    """Kimi's stream: no event names, the usage inside the last chunk's choice, [DONE]."""
    events: list = [(None, chunk("", role="assistant"))]
    events += [(None, chunk(t)) for t in text]
    events += [(None, chunk(finish="stop", usage=usage)), (None, "[DONE]")]
    return events


def openai_events() -> list:
    """OpenAI's stream with include_usage: "usage": null in every chunk, then a chunk
    with no choices and the usage at its top level."""
    events: list = [(None, {**chunk(t), "usage": None}) for t in ("Hi", " there")]
    events.append((None, {**chunk(finish="stop"), "usage": None}))
    events.append((None, {"id": "chatcmpl-6f1c2a", "object": "chat.completion.chunk", "choices": [], "usage": {
        "prompt_tokens": 900, "completion_tokens": 40, "total_tokens": 940,
        "prompt_tokens_details": {"cached_tokens": 512, "audio_tokens": 0}}}))
    events.append((None, "[DONE]"))
    return events


def scan(chunks: Iterable[bytes], shape: Shape, end: bool = True, **kw: int) -> UsageScanner:
    scanner = UsageScanner(shape, **kw)
    for piece in chunks:
        scanner.feed(piece)
    if end:
        scanner.feed(b"")
    return scanner


def split_at(body: bytes, *points: int) -> list[bytes]:
    cuts = [0, *sorted(points), len(body)]
    return [body[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


# -- Usage -------------------------------------------------------------------------------

def test_usage_adds_up_and_says_its_cache_share() -> None:
    total = Usage(100, 10, 60, 5) + Usage(300, 20, 240, 0)
    assert total == Usage(input=400, output=30, cache_read=300, cache_write=5)
    assert total.cache_share == 0.75
    assert Usage(0, 5).cache_share is None
    assert sum([Usage(1, 2, 0, 1), Usage(3, 4, 1, 0)], Usage()) == Usage(4, 6, 1, 1)
    assert total.as_fields() == {"input": 400, "output": 30, "cacheRead": 300, "cacheWrite": 5}
    assert Usage.from_fields(total.as_fields()) == total
    assert Usage.from_fields({"input": 7}) == Usage(7)
    for odd in ({"input": -1}, {"output": 1.5}, {"cacheRead": True}, {"input": "3"}, [1, 2], None):
        assert Usage.from_fields(odd) is None, odd
    for bad in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError):
            Usage(input=bad)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        total.input = 1  # type: ignore[misc]


@pytest.mark.parametrize(("path", "shape"), [
    ("/coding/v1/messages", A), ("/coding/v1/messages?beta=true", A), ("/anthropic/v1/messages/", A),
    ("/coding/v1/chat/completions", O), ("/v1/chat/completions?x=1", O),
    ("/coding/v1/messages/count_tokens", None), ("/coding/v1/batch_messages", None), ("/coding/v1/models", None), ("/coding/v1/usages", None),
])
def test_the_shape_comes_from_the_path(path: str, shape: Shape | None) -> None:
    assert shape_for_path(path) is shape


# -- whole JSON answers --------------------------------------------------------------------

def anthropic_answer(usage: object) -> bytes:
    return json.dumps({"id": "msg_01", "type": "message", "role": "assistant", "model": "kimi-for-coding",
                       "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                       "stop_sequence": None, "usage": usage}).encode()


def openai_answer(usage: object, **top: object) -> bytes:
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "kimi-for-coding",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                    "finish_reason": "stop"}], "usage": usage, **top}).encode()


def test_a_whole_anthropic_answer_counts_all_its_input() -> None:
    assert from_json_answer(anthropic_answer({**start_usage(), "output_tokens": 612}), A) == ANTHROPIC_EXPECTED
    # cache figures absent or null: nothing read from or written to the cache
    assert from_json_answer(anthropic_answer({"input_tokens": 12, "output_tokens": 3}), A) == Usage(12, 3)
    assert from_json_answer(anthropic_answer({"input_tokens": 12, "output_tokens": 3,
                                              "cache_read_input_tokens": None}), A) == Usage(12, 3)


def test_a_whole_openai_answer_reads_kimis_and_openais_cached_figure() -> None:
    assert from_json_answer(openai_answer(KIMI_USAGE), O) == OPENAI_EXPECTED
    assert from_json_answer(openai_answer({"prompt_tokens": 900, "completion_tokens": 40, "total_tokens": 940,
                                           "prompt_tokens_details": {"cached_tokens": 512}}), O) == Usage(900, 40, 512)
    assert from_json_answer(openai_answer({"prompt_tokens": 9, "completion_tokens": 4}), O) == Usage(9, 4)
    both = {**KIMI_USAGE, "prompt_tokens_details": {"cached_tokens": 7}}  # Kimi's own figure first
    assert from_json_answer(openai_answer(both), O) == OPENAI_EXPECTED
    # Kimi's usage inside the choice (as in its streams) is read too
    body = json.dumps({"choices": [{"index": 0, "usage": KIMI_USAGE}]}).encode()
    assert from_json_answer(body, O) == OPENAI_EXPECTED


@pytest.mark.parametrize("body", [
    b'{"type":"error","error":{"type":"rate_limit_error","message":"The engine is currently overloaded"}}',
    b"<html>502 Bad Gateway</html>", b"", b"null", b"[1,2]", b'"usage"', b"\xff\xfe\x00garbage",
    b'{"usage": null}', b'{"usage": []}', b'{"usage": "lots"}',
    b"[" * 100_000 + b"]" * 100_000, b'{"usage":' + b"{" * 50_000,
    b'{"usage": {"input_tokens": 1' + b"0" * 5000 + b', "output_tokens": 1}}',
])
def test_a_whole_answer_without_a_usable_usage_counts_nothing(body: bytes) -> None:
    assert from_json_answer(body, A) is None
    assert from_json_answer(body, O) is None


def parsed_whole(body: bytes, shape: Shape) -> Usage | None:
    """What a whole answer says, read from its whole parse: the reference the reading
    of its last member alone must agree with."""
    document = json.loads(body)
    if shape is O:
        top = document.get("usage")
        if top is not None:
            return from_json_answer(json.dumps({"usage": top}).encode(), O)
        return from_json_answer(json.dumps({"choices": document.get("choices")}).encode(), O)
    usage = document.get("usage")
    return from_json_answer(json.dumps({"usage": usage}).encode(), A) if isinstance(usage, dict) else None


NESTED = {"input_tokens": 900, "output_tokens": 900}
TOP = {"input_tokens": 12, "output_tokens": 3}
OPENAI_TOP = {"prompt_tokens": 9, "completion_tokens": 4}


@pytest.mark.parametrize("body", [
    # a nested "usage" last in the content, or in a tool's input, is not the answer's
    b'{"content":[{"type":"tool_use","name":"usage","input":{"usage":%s}}]}' % json.dumps(NESTED).encode(),
    b'{"content":[{"type":"tool_use","input":{"usage":%s}}],"usage":%s}' % (
        json.dumps(NESTED).encode(), json.dumps(TOP).encode()),
    b'{"usage":%s,"content":[{"input":{"usage":%s}}]}' % (json.dumps(TOP).encode(), json.dumps(NESTED).encode()),
    b'{"message":{"usage":%s}}' % json.dumps(NESTED).encode(),
    # text that writes "usage" as a key: its quotes are escaped
    b'{"content":[{"type":"text","text":"{\\"usage\\":{\\"input_tokens\\":1,\\"output_tokens\\":1}}"}]}',
    b'{"he said \\"usage": %s}' % json.dumps(NESTED).encode(),
    b'{"content":"\\\\","usage":%s}' % json.dumps(TOP).encode(),  # an escaped backslash ends a string
    # the last member's forms: spaced, on lines, as json.dumps writes it
    b'{ "id" : "m" ,\r\n\t"usage"\n:\t%s \n}\n' % json.dumps(TOP).encode(),
    json.dumps({"id": "m", "usage": TOP}, indent=2).encode(),
    json.dumps({"choices": [{"usage": NESTED}], "usage": OPENAI_TOP}).encode(),
    json.dumps({"choices": [{"usage": {"prompt_tokens": 9, "completion_tokens": 4}}]}).encode(),
    # a repeated key: the last one counts, as in a whole parse
    b'{"usage":%s,"usage":%s}' % (json.dumps(NESTED).encode(), json.dumps(TOP).encode()),
    b'{"usage":%s,"id":"m","usage":%s,"x":1}' % (json.dumps(TOP).encode(), json.dumps(NESTED).encode()),
    # odd values of a last "usage"
    b'{"usage":{"input_tokens":1,"output_tokens":2},"usage":null}',
    b'{"usage":{"input_tokens":"1","output_tokens":2}}',
    b'{"usage":{"input_tokens":1,"output_tokens":2,"prompt_tokens":5,"completion_tokens":2}}',
    b'{"usage":{"input_tokens":1,"output_tokens":2}} ',
    b'{"id":"\xc3\xa9","usage":{"input_tokens":1,"output_tokens":2}}',
])
def test_the_last_members_usage_reads_as_the_whole_answers(body: bytes) -> None:
    for shape in (A, O):
        assert from_json_answer(body, shape) == parsed_whole(body, shape), (shape, body)


def test_an_answer_is_believed_only_when_its_usage_object_closes_it() -> None:
    # what follows the object, when it is not the answer's closing brace, sends it to a whole parse
    assert from_json_answer(b'{"usage":{"input_tokens":1,"output_tokens":2}}}', A) is None
    assert from_json_answer(b'{"usage":{"input_tokens":1,"output_tokens":2}}]', A) is None
    assert from_json_answer(b'{"usage":{"input_tokens":1,"output_tokens":2}', A) is None
    assert from_json_answer(b'["usage",{"input_tokens":1,"output_tokens":2}]', A) is None
    assert from_json_answer(b'{"x":["usage",{"input_tokens":1,"output_tokens":2}]}', A) is None
    assert from_json_answer(b'{"usage":{"input_tokens":1,"output_tokens":2\xff}}', A) is None


ABSURD = [-1, 1.5, 3.0, True, False, "12", [1], {"n": 1}, MAX_TOKENS + 1, 10 ** 30]


@pytest.mark.parametrize("value", ABSURD)
def test_absurd_figures_count_nothing(value: object) -> None:
    for name in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert from_json_answer(anthropic_answer({**start_usage(), name: value}), A) is None, name
    for usage in ({**KIMI_USAGE, "prompt_tokens": value}, {**KIMI_USAGE, "completion_tokens": value},
                  {**KIMI_USAGE, "cached_tokens": value},
                  {"prompt_tokens": 9, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": value}}):
        assert from_json_answer(openai_answer(usage), O) is None, usage
    assert from_json_answer(anthropic_answer({**start_usage(), "output_tokens": MAX_TOKENS}), A) is not None


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_nan_and_infinity_count_nothing(literal: bytes) -> None:
    assert from_json_answer(b'{"usage":{"input_tokens":%s,"output_tokens":1}}' % literal, A) is None
    assert from_json_answer(b'{"usage":{"prompt_tokens":5,"completion_tokens":%s}}' % literal, O) is None


def test_more_cached_than_sent_counts_nothing() -> None:
    assert from_json_answer(openai_answer({**KIMI_USAGE, "cached_tokens": 48201}), O) is None


# -- streams: the whole, split anywhere ----------------------------------------------------

def test_an_anthropic_stream_in_one_piece() -> None:
    scanner = scan([sse(anthropic_events())], A)
    assert scanner.result() == ANTHROPIC_EXPECTED and scanner.complete
    # only the two events that carry usage were parsed: not the tool named "usage", not the deltas
    assert scanner.events_read == 2
    assert from_event_stream(sse(anthropic_events()), A) == ANTHROPIC_EXPECTED


def test_kimis_openai_stream_in_one_piece() -> None:
    scanner = scan([sse(kimi_events())], O)
    assert scanner.result() == OPENAI_EXPECTED and scanner.complete and scanner.events_read == 1


def test_openais_stream_reads_the_top_level_usage_and_never_parses_the_nulls() -> None:
    scanner = scan([sse(openai_events())], O)
    assert scanner.result() == Usage(900, 40, 512) and scanner.events_read == 1


STREAMS = [
    pytest.param(A, sse(anthropic_events()), ANTHROPIC_EXPECTED, id="anthropic"),
    pytest.param(A, sse(anthropic_events(), nl="\r\n"), ANTHROPIC_EXPECTED, id="anthropic-crlf"),
    pytest.param(A, sse(anthropic_events(), nl="\r"), ANTHROPIC_EXPECTED, id="anthropic-cr"),
    pytest.param(O, sse(kimi_events()), OPENAI_EXPECTED, id="kimi"),
    pytest.param(O, sse(kimi_events(), nl="\r\n"), OPENAI_EXPECTED, id="kimi-crlf"),
    pytest.param(O, sse(openai_events()), Usage(900, 40, 512), id="openai"),
]


@pytest.mark.parametrize(("shape", "body", "expected"), STREAMS)
def test_a_stream_split_at_every_byte_reads_the_same(shape: Shape, body: bytes, expected: Usage) -> None:
    for point in range(1, len(body)):
        scanner = scan(split_at(body, point), shape)
        assert (scanner.result(), scanner.complete) == (expected, True), f"split at {point}: {body[:point][-40:]!r}"


@pytest.mark.parametrize(("shape", "body", "expected"), STREAMS)
def test_a_stream_fed_byte_by_byte_or_in_random_pieces_reads_the_same(shape: Shape, body: bytes,
                                                                      expected: Usage) -> None:
    assert scan([body[i:i + 1] for i in range(len(body))], shape).result() == expected
    rng = random.Random(26)
    for _ in range(200):
        points = rng.sample(range(1, len(body)), rng.randint(2, 12))
        assert scan(split_at(body, *points), shape).result() == expected, sorted(points)


def test_line_ends_may_mix_within_a_stream() -> None:
    body = sse(anthropic_events()[:1], nl="\r\n") + sse(anthropic_events()[1:-2], nl="\r") + \
        sse(anthropic_events()[-2:], nl="\n")
    assert from_event_stream(body, A) == ANTHROPIC_EXPECTED


def test_an_anthropic_stream_without_event_lines_is_read_by_its_types() -> None:
    body = sse([(None, data) for _, data in anthropic_events()])
    assert from_event_stream(body, A) == ANTHROPIC_EXPECTED


def test_a_byte_order_mark_at_the_start_is_not_part_of_the_first_event() -> None:
    body = sse([(None, data) for _, data in anthropic_events()])  # the first line is data:
    assert from_event_stream(b"\xef\xbb\xbf" + body, A) == ANTHROPIC_EXPECTED
    assert from_event_stream(b"\xef\xbb\xbf" + sse(anthropic_events()), A) == ANTHROPIC_EXPECTED


def test_an_event_written_on_several_data_lines_is_read_whole() -> None:
    events = anthropic_events()
    start = json.dumps(events[0][1], indent=1)  # one data: line per JSON line
    delta = '{"type":"message_delta",\ndata: "usage"\ndata: :{"output_tokens":612}}'
    body = ("event: message_start\n" + "".join(f"data: {line}\n" for line in start.splitlines()) + "\n").encode()
    body += sse(events[1:-2]) + f"event: message_delta\ndata: {delta}\n\n".encode() + sse(events[-1:])
    for point in range(1, len(body)):
        assert scan(split_at(body, point), A).result() == ANTHROPIC_EXPECTED, point


def test_comments_and_unknown_fields_in_a_usage_event_are_ignored() -> None:
    body = sse(anthropic_events()[:-2]) + (
        b": keep-alive\nid: 7\nretry: 100\nevent: message_delta\n"
        b'data: {"type":"message_delta","usage":{"output_tokens":612}}\n\n') + sse(anthropic_events()[-1:])
    assert from_event_stream(body, A) == ANTHROPIC_EXPECTED


START_FORMS = [  # message_start's data as other writers may write it: each read by JSON's rules
    '{"type":"message_start","message":{"usage":{"cache_read_input_tokens":41000,"output_tokens":1,'
    '"cache_creation_input_tokens":96,"input_tokens":2107},"id":"m","content":[]}}',  # usage first, other order
    '{ "type" : "message_start" , "message" : { "usage" : { "input_tokens" : 2107 ,'
    ' "cache_read_input_tokens" : 41000 , "cache_creation_input_tokens" : 96 } } }',  # spaces everywhere
    '{"type":"message_start","message":{"usage":{"\\u0069nput_tokens":2107,"cache_read_input_tokens":41000,'
    '"cache_creation_input_tokens":96,"server_tool_use":{"web_search_requests":0},"service_tier":"standard"}}}',
    '{"type":"message_start","message":{"usage":{"input_tokens":5,"cache_read_input_tokens":41000,'
    '"cache_creation_input_tokens":96,"input_tokens":2107}}}',  # a repeated key: the last counts
]


@pytest.mark.parametrize("data", START_FORMS)
def test_a_message_start_in_another_form_counts_the_same_whole_or_split(data: str) -> None:
    body = sse([("message_start", data)]) + sse(anthropic_events()[1:])
    events = [e + b"\n\n" for e in body.split(b"\n\n")[:-1]]
    assert scan(events, A).result() == ANTHROPIC_EXPECTED  # each event whole in its chunk
    for point in range(1, len(body), 7):
        assert scan(split_at(body, point), A).result() == ANTHROPIC_EXPECTED, point


@pytest.mark.parametrize("delta", [
    b": a comment\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":612}}",
    b"id: 9\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":612}}",
    b"event: message_delta\ndata: {\"type\":\"message_delta\",\ndata: \"usage\":{\"output_tokens\":612}}",
    b"event:message_delta\r\ndata:{\"type\":\"message_delta\",\"usage\":{\"output_tokens\":612}}",
    b"event: odd:name\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":612}}",
    b"event: message_delta\ndata: {\"usage\":{\"output_tokens\":612}}\nevent: message_delta",
])
def test_a_usage_event_whole_in_its_chunk_in_any_form_reads_as_when_split(delta: bytes) -> None:
    head, tail = sse(anthropic_events()[:-2]), sse(anthropic_events()[-1:])
    whole = scan([head, delta + b"\n\n", tail], A)  # the event whole in one chunk
    split = scan([head, *[delta[i:i + 1] for i in range(len(delta))], b"\n\n", tail], A)
    assert whole.result() == split.result() == ANTHROPIC_EXPECTED
    assert whole.events_read == split.events_read


def test_a_chunk_holding_several_usage_events_reads_them_all_the_last_delta_winning() -> None:
    events = anthropic_events()
    second = ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 700}})
    body = sse(events[:-1] + [second] + events[-1:])
    scanner = scan([body], A)
    assert scanner.result() == Usage(input=2107 + 41000 + 96, output=700, cache_read=41000, cache_write=96)
    assert scanner.complete


def test_the_last_message_delta_wins_and_a_larger_repeated_input_counts() -> None:
    events = anthropic_events()
    more = [("message_delta", {"type": "message_delta", "usage": {"output_tokens": 700}}),
            ("message_delta", {"type": "message_delta", "usage": {
                "output_tokens": 750, "input_tokens": 0, "cache_read_input_tokens": 41500}})]
    usage = from_event_stream(sse(events[:-1] + more + events[-1:]), A)
    assert usage == Usage(input=2107 + 41500 + 96, output=750, cache_read=41500, cache_write=96)


# -- streams cut short, without usage, odd, hostile ------------------------------------------

def test_an_anthropic_stream_cut_short_counts_what_kimi_said_before_the_cut() -> None:
    body = sse(anthropic_events())
    start_end = body.index(b"\n\n") + 2
    delta_at = body.index(b"event: message_delta")
    for cut in range(len(body)):
        scanner = scan([body[:cut]], A, end=False)  # the connection dropped: no b"" end
        got = scanner.result()
        if cut < start_end - 2:  # message_start not whole yet
            assert got is None, cut
        elif cut < delta_at + 60:  # only message_start: its placeholder output figure
            assert got == Usage(2107 + 41000 + 96, 1, 41000, 96), cut
            assert not scanner.complete
        # and a cut stream that did end (b"") never says more than the whole one
        ended = scan([body[:cut]], A).result()
        assert ended is None or (ended.input == ANTHROPIC_EXPECTED.input and ended.output in (1, 612)), cut


def test_an_unterminated_last_event_counts_when_its_json_is_whole() -> None:
    body = sse(anthropic_events()[:-1]).rstrip(b"\n")  # message_delta, no blank line after it
    scanner = scan([body], A, end=False)
    assert scanner.result() == ANTHROPIC_EXPECTED  # read from the open event, without ending
    scanner.feed(b"\n\n" + sse(anthropic_events()[-1:]))  # the stream goes on: nothing lost
    scanner.feed(b"")
    assert scanner.result() == ANTHROPIC_EXPECTED and scanner.complete


def test_an_openai_stream_cut_before_its_usage_counts_nothing() -> None:
    body = sse(kimi_events())
    assert scan([body[:body.index(b'"usage"')]], O).result() is None
    assert from_event_stream(sse(kimi_events(usage=None)), O) is None


def test_a_stream_without_usage_counts_nothing() -> None:
    events = [e for e in anthropic_events() if e[0] not in ("message_start", "message_delta")]
    assert from_event_stream(sse(events), A) is None
    assert from_event_stream(b"", A) is None
    assert from_event_stream(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n",
                             A) is None


@pytest.mark.parametrize("value", ABSURD)
def test_absurd_figures_in_a_stream_count_nothing(value: object) -> None:
    assert from_event_stream(sse(anthropic_events(usage=start_usage(input_tokens=value), output=5)), A) \
        == Usage(0, 5, 0, 0)  # the start's figures are dropped, the delta's kept
    scanner = scan([sse(anthropic_events(output=value))], A)
    assert scanner.result() == Usage(2107 + 41000 + 96, 1, 41000, 96) and not scanner.complete
    assert from_event_stream(sse(kimi_events(usage={**KIMI_USAGE, "completion_tokens": value})), O) is None


def test_a_giant_text_delta_writing_usage_and_fake_events_is_not_mistaken() -> None:
    fake = ('"usage": {"input_tokens": 999999, "output_tokens": 999999}\n\nevent: message_delta\n'
            'data: {"type":"message_delta","usage":{"output_tokens":999999}}\n\n') * 2000  # ~230 KB
    body = sse(anthropic_events(text_deltas=("Hi", fake, "usage", '"usage":{}', fake[:70_000])))
    assert body.count(b"usage") > 4000
    for pieces in ([body], split_at(body, *range(1, len(body), 1500)), split_at(body, *range(1, len(body), 4096))):
        scanner = scan(pieces, A)
        assert scanner.result() == ANTHROPIC_EXPECTED and scanner.events_read == 2
    kimi = sse(kimi_events(text=("Hi", fake, "usage")))
    assert scan(split_at(kimi, *range(1, len(kimi), 777)), O).result() == OPENAI_EXPECTED


def test_a_usage_event_larger_than_the_limit_is_skipped_not_buffered() -> None:
    events = anthropic_events()
    big_start = json.loads(json.dumps(events[0][1]))
    big_start["message"]["content"] = [{"type": "text", "text": "x" * (MAX_EVENT_BYTES + 10)}]
    body = sse([("message_start", big_start), *events[1:]])
    for pieces in ([body], split_at(body, *range(1, len(body), 1000))):
        scanner = scan(pieces, A)
        # the start was skipped (too large), the delta read: output only
        assert scanner.result() == Usage(0, 612) and scanner.events_skipped == 1 and not scanner.complete
    # the usage before the bulk this time: its event is read on, then found too large
    big_delta = {"type": "message_delta", "usage": {"output_tokens": 612}, "pad": "y" * (2 * MAX_EVENT_BYTES)}
    body = sse([*events[:-2], ("message_delta", big_delta), events[-1]])
    scanner = scan(split_at(body, *range(1, len(body), 3000)), A)
    assert scanner.result() == Usage(2107 + 41000 + 96, 1, 41000, 96) and scanner.events_skipped == 1


def test_an_event_whose_start_is_out_of_reach_is_skipped_not_read_from_the_middle() -> None:
    # Read whole, this event's data is two JSON documents (not JSON): it counts nothing.
    # Read from a line in its middle, it would look like a message_delta.
    events = anthropic_events()
    odd = (b'data: {"pad": "' + b"y" * (MAX_EVENT_BYTES + 10) + b'"}\n'
           b'data: {"type":"message_delta","usage":{"output_tokens":5}}\n\n')
    body = sse(events[:-2]) + odd + sse(events[-1:])
    for pieces in ([body], split_at(body, *range(1, len(body), 5000))):
        scanner = scan(pieces, A)
        assert scanner.result() == Usage(2107 + 41000 + 96, 1, 41000, 96) and scanner.events_skipped == 1


@pytest.mark.parametrize("nl", ["\n", "\r\n", "\r"])
def test_reading_goes_on_right_after_a_skipped_event_wherever_its_end_is_split(nl: str) -> None:
    events = anthropic_events()
    big_start = json.loads(json.dumps(events[0][1]))
    big_start["message"]["content"] = [{"type": "text", "text": "x" * (MAX_EVENT_BYTES + 10)}]
    body = sse([("message_start", big_start), events[-2]], nl=nl)  # the delta right after it
    end = body.index(b"event: message_delta")
    for point in range(end - 8, end + 3):
        scanner = scan(split_at(body, point), A)
        assert (scanner.result(), scanner.events_skipped) == (Usage(0, 612), 1), point


def test_an_event_named_only_by_its_event_line_is_read() -> None:
    events = [(name, {k: v for k, v in data.items() if k != "type"}) for name, data in anthropic_events()]
    assert from_event_stream(sse(events), A) == ANTHROPIC_EXPECTED


def test_memory_stays_bounded_whatever_the_stream_does() -> None:
    scanner = UsageScanner(A)
    most = 0
    # one endless event, a usage key every few hundred bytes, never a blank line
    endless = b'event: message_delta\ndata: {"type":"message_delta"' + b',"usage":{"output_tokens":1},"x":"' + b"z" * 300
    for i in range(20_000):  # ~7 MB in one event, in chunks of every size
        piece = endless[: 1 + i % len(endless)] if i % 3 else endless
        scanner.feed(piece)
        most = max(most, scanner.held_bytes)
    for _ in range(200):  # and chunks far larger than the limit
        scanner.feed(b"q" * (3 * MAX_EVENT_BYTES))
        most = max(most, scanner.held_bytes)
    # the stream's last 64 to 128 KB (references to its chunks) and one candidate event of 64 KB
    assert most <= 3 * MAX_EVENT_BYTES + 6, most
    scanner.feed(b"")
    assert scanner.result() is None and scanner.held_bytes == 0


def test_one_byte_chunks_keep_memory_bounded() -> None:
    scanner = UsageScanner(A)
    body = sse(anthropic_events(text_deltas=["word "] * 4000))
    most = 0
    for i in range(len(body)):
        scanner.feed(body[i:i + 1])
        most = max(most, scanner.held_bytes)
    scanner.feed(b"")
    assert scanner.result() == ANTHROPIC_EXPECTED
    # the stream's last 64 KB (plus up to 256 one-byte pieces not yet joined) and the
    # usage event being read (a few hundred bytes)
    assert most <= MAX_EVENT_BYTES + 256 + 500, most


@pytest.mark.parametrize("evil", [
    b'data: {"type":"message_delta","usage":' + b"[" * 60_000 + b"\n\n",
    b'data: {"type":"message_delta","usage":{"output_tokens":1' + b"0" * 5000 + b"}}\n\n",
    b'data: {"type":"message_delta","usage":{"output_tokens":NaN}}\n\n',
    b'data: {"type":"message_delta","usage":{"output_tokens":5}}\xff\xfe\n\n',
    b'data: {"type":"message_start","message":{"usage":{"input_tokens":{"deep":' + b"{" * 40_000 + b"\n\n",
])
def test_hostile_usage_events_never_raise(evil: bytes) -> None:
    for shape in (A, O):
        for step in (1, 7, 4096, len(evil)):
            assert scan(split_at(evil, *range(step, len(evil), step)), shape).result() is None


def test_after_the_end_nothing_more_is_read() -> None:
    scanner = scan([sse(kimi_events())], O)
    scanner.feed(sse([(None, chunk(finish="stop", usage={**KIMI_USAGE, "prompt_tokens": 1}))]))
    assert scanner.result() == OPENAI_EXPECTED


# -- against a reference: every event parsed, the whole body at once ---------------------

def reference(body: bytes, shape: Shape) -> Usage | None:
    """The usage by the SSE rules read plainly: every line, every event parsed (an
    unterminated last one too), the same figures taken."""
    scanner = UsageScanner(shape)  # only for its rules on one event (_dispatch)
    lines = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    event: list[bytes] = []
    for line in [*lines, b""]:
        if line:
            event.append(line)
        elif event:
            scanner._dispatch(b"\n".join(event), False)
            event = []
    return scanner.result()


def random_stream(rng: random.Random, shape: Shape) -> bytes:
    base = anthropic_events() if shape is A else rng.choice([kimi_events(), openai_events()])
    extra = [("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
                 "type": "text_delta", "text": rng.choice(['"usage": {"input_tokens": 1}', "usage\n\n", "x" * 900])}}),
             (None, {"usage": None, "choices": []}),
             ("message_delta", {"type": "message_delta", "usage": {"output_tokens": rng.randint(0, 9999)}}),
             (None, chunk(finish="stop", usage={**KIMI_USAGE, "completion_tokens": rng.randint(0, 9999)}))]
    events = list(base)
    for _ in range(rng.randint(0, 4)):
        events.insert(rng.randint(1, len(events)), rng.choice(extra))
    out = b""
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), indent=rng.choice([None, 1]))
        lines = ([f"event: {name}"] if name and rng.random() < 0.8 else []) + \
            [f"data: {line}" for line in text.split("\n")]
        if rng.random() < 0.2:
            lines.insert(0, ": ping")
        for line in lines:
            out += line.encode() + rng.choice([b"\n", b"\r\n", b"\r"])
        out += rng.choice([b"\n", b"\r\n", b"\r"])
    if rng.random() < 0.3:  # cut short
        out = out[:rng.randint(0, len(out))]
    return out


def cut_points(rng: random.Random, body: bytes) -> list[int]:
    """Up to 40 places to cut `body` into chunks."""
    return rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 40))) if len(body) > 1 else []


@pytest.mark.parametrize("shape", [A, O])
def test_the_scanner_agrees_with_a_plain_reading_of_random_streams(shape: Shape) -> None:
    rng = random.Random(2600 + (shape is O))
    for i in range(400):
        body = random_stream(rng, shape)
        assert scan(split_at(body, *cut_points(rng, body)), shape).result() == reference(body, shape), (i, body[:300])


@pytest.mark.parametrize("shape", [A, O])
def test_asking_for_the_usage_between_chunks_reads_the_same(shape: Shape) -> None:
    # Chunks are scanned together when the usage is asked for, at the end or when the
    # kept bytes are trimmed: asked after every chunk, each chunk is scanned on its own.
    rng = random.Random(2700 + (shape is O))
    for i in range(200):
        body = random_stream(rng, shape)
        scanner = UsageScanner(shape)
        for piece in split_at(body, *cut_points(rng, body)):
            scanner.feed(piece)
            scanner.result()
        scanner.feed(b"")
        assert scanner.result() == reference(body, shape), (i, body[:300])
