"""Usage reading cost: the stream scanner and the JSON reader, in process, no network.

`rotator.tokens.UsageScanner` sees every chunk of every streamed answer (a
`response.stream` callable), so its cost per chunk is added to each event mitmproxy
forwards. Timed here on streams of 500 events, written as Kimi writes them:

  anthropic        /coding/v1/messages: message_start, 500 text deltas, message_delta, …
  anthropic 16K    the same bytes in 16 KB chunks (a fast upstream, coalesced reads)
  kimi openai      /coding/v1/chat/completions: 500 chunks, usage in the last one's choice
  openai nulls     OpenAI's include_usage: "usage": null in every chunk, usage at the end

One chunk is one event unless said. Arms, each timed on the same chunks:

  floor     iterating the chunks and nothing else
  no-op     handing each chunk to a function that does nothing (any stream callable)
  scanner   a new UsageScanner per stream: feed() each chunk, feed(b""), result()

Printed: CPU µs per stream (median of samples, time.process_time_ns), CPU ms per
streamed MB, µs per chunk, and the ratios scanner / floor and scanner − no-op per
chunk; then from_json_answer on a 50 KB answer of each shape beside json.loads alone.
Every scan's result is checked against the usage written into the stream. Nothing
timing-related is asserted: the figures are for reading.

    python bench/token_scan.py [--quick]
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from rotator.tokens import Shape, Usage, UsageScanner, from_json_answer  # noqa: E402

EVENTS = 500
WORDS = ("the ", "proxy ", "reads ", "usage ", "from ", "each ", "answer ", "without ", "delay ", "and ",
         "cache ", "hits ", "per ", "key, ", "conversation ", "or ", "machine. ")
ANTHROPIC_USAGE = Usage(input=2107 + 41000 + 96, output=612, cache_read=41000, cache_write=96)
OPENAI_USAGE = Usage(input=48200, output=612, cache_read=41000)


def frame(data: object, name: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return ((f"event: {name}\n" if name else "") + f"data: {text}\n\n").encode()


def delta_text(i: int) -> str:
    return "".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4))


def anthropic_stream() -> list[bytes]:
    events = [frame({"type": "message_start", "message": {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": "kimi-for-coding",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 2107, "cache_creation_input_tokens": 96, "cache_read_input_tokens": 41000,
                  "output_tokens": 1}}}, "message_start"),
        frame({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              "content_block_start")]
    events += [frame({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
                                                                           "text": delta_text(i)}},
                     "content_block_delta") for i in range(EVENTS)]
    events += [frame({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               frame({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                      "usage": {"output_tokens": 612}}, "message_delta"),
               frame({"type": "message_stop"}, "message_stop")]
    return events


def openai_chunk(i: int, content: str | None, **extra: object) -> dict:
    return {"id": "chatcmpl-6f1c2a", "object": "chat.completion.chunk", "created": 1767225600,
            "model": "kimi-for-coding",
            "choices": [{"index": 0, "delta": {} if content is None else {"content": content},
                         "finish_reason": None}], **extra}


def kimi_stream() -> list[bytes]:
    chunks = [frame(openai_chunk(i, delta_text(i))) for i in range(EVENTS)]
    last = openai_chunk(EVENTS, None)
    last["choices"][0].update(finish_reason="stop", usage={"prompt_tokens": 48200, "completion_tokens": 612,
                                                           "total_tokens": 48812, "cached_tokens": 41000})
    return chunks + [frame(last), frame("[DONE]")]


def openai_nulls_stream() -> list[bytes]:
    chunks = [frame(openai_chunk(i, delta_text(i), usage=None)) for i in range(EVENTS)]
    chunks.append(frame({"id": "chatcmpl-6f1c2a", "object": "chat.completion.chunk", "choices": [],
                         "usage": {"prompt_tokens": 48200, "completion_tokens": 612, "total_tokens": 48812,
                                   "prompt_tokens_details": {"cached_tokens": 41000}}}))
    return chunks + [frame("[DONE]")]


def coalesced(chunks: list[bytes], size: int) -> list[bytes]:
    body = b"".join(chunks)
    return [body[i:i + size] for i in range(0, len(body), size)]


def floor(chunks: list[bytes], shape: Shape) -> None:
    for _ in chunks:
        pass


def _nothing(chunk: bytes) -> None:
    return None


def no_op(chunks: list[bytes], shape: Shape) -> None:
    f = _nothing
    for c in chunks:
        f(c)
    f(b"")


def scanner(chunks: list[bytes], shape: Shape) -> Usage | None:
    s = UsageScanner(shape)
    feed = s.feed
    for c in chunks:
        feed(c)
    feed(b"")
    return s.result()


def cpu_us_per_call(fn: Callable[[], object], samples: int, min_sample_s: float) -> float:
    """The median CPU µs of one call, from samples of enough calls to last min_sample_s."""
    calls = 1
    while True:  # calibrate
        t0 = time.process_time_ns()
        for _ in range(calls):
            fn()
        took = time.process_time_ns() - t0
        if took >= min_sample_s * 1e9 or calls >= 1 << 20:
            break
        calls *= 2
    per_call = []
    for _ in range(samples):
        t0 = time.process_time_ns()
        for _ in range(calls):
            fn()
        per_call.append((time.process_time_ns() - t0) / calls / 1000)
    return C.median(per_call)


def main() -> int:
    ap = C.parser(__doc__.split("\n")[0])
    args = ap.parse_args()
    samples, min_sample_s = (3, 0.01) if args.quick else (15, 0.1)
    C.print_header("usage reading cost (in process, no network)",
                   [f"per figure: median of {samples} samples of ≥ {min_sample_s * 1000:g} ms CPU "
                    f"(time.process_time_ns); gc on"])
    streams = {
        "anthropic": (anthropic_stream(), Shape.ANTHROPIC, ANTHROPIC_USAGE),
        "anthropic 16K": (coalesced(anthropic_stream(), 16 * 1024), Shape.ANTHROPIC, ANTHROPIC_USAGE),
        "kimi openai": (kimi_stream(), Shape.OPENAI, OPENAI_USAGE),
        "openai nulls": (openai_nulls_stream(), Shape.OPENAI, OPENAI_USAGE),
    }
    wrong = [name for name, (chunks, shape, expected) in streams.items() if scanner(chunks, shape) != expected]
    rows, per_mb = [], {}
    with C.watchdog(120 if args.quick else 900):
        for name, (chunks, shape, _) in streams.items():
            size = sum(map(len, chunks))
            gc.collect()
            us = {arm.__name__: cpu_us_per_call(lambda a=arm: a(chunks, shape), samples, min_sample_s)
                  for arm in (floor, no_op, scanner)}
            mb = size / 1e6
            per_mb[name] = (us["scanner"] / 1000 / mb, us["floor"] / 1000 / mb)
            rows.append([name, f"{size / 1024:.1f}", len(chunks), f"{us['floor']:.1f}", f"{us['no_op']:.1f}",
                         f"{us['scanner']:.1f}", f"{us['scanner'] / 1000 / mb:.2f}",
                         f"{us['scanner'] / len(chunks):.3f}", f"{us['scanner'] / us['floor']:.1f}",
                         f"{(us['scanner'] - us['no_op']) / len(chunks):.3f}"])
        answers = {
            "anthropic": (json.dumps({
                "id": "msg_01", "type": "message", "role": "assistant", "model": "kimi-for-coding",
                "content": [{"type": "text", "text": "".join(delta_text(i) for i in range(6000))[:50_000]}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 2107, "cache_creation_input_tokens": 96,
                          "cache_read_input_tokens": 41000, "output_tokens": 612}}).encode(),
                Shape.ANTHROPIC, ANTHROPIC_USAGE),
            "openai": (json.dumps({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "kimi-for-coding",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "".join(delta_text(i) for i in range(6000))[:50_000]}}],
                "usage": {"prompt_tokens": 48200, "completion_tokens": 612, "total_tokens": 48812,
                          "cached_tokens": 41000}}).encode(), Shape.OPENAI, OPENAI_USAGE),
        }
        wrong += [f"{name} JSON" for name, (body, shape, expected) in answers.items()
                  if from_json_answer(body, shape) != expected]
        json_rows = []
        for name, (body, shape, _) in answers.items():
            read = cpu_us_per_call(lambda b=body, s=shape: from_json_answer(b, s), samples, min_sample_s)
            loads = cpu_us_per_call(lambda b=body: json.loads(b), samples, min_sample_s)
            json_rows.append([name, f"{len(body) / 1024:.1f}", f"{read:.1f}", f"{loads:.1f}", f"{read / loads:.2f}"])

    print("streams: CPU per stream, per streamed MB and per chunk")
    C.print_table(["stream", "KB", "chunks", "floor µs", "no-op µs", "scanner µs", "scanner ms/MB",
                   "µs/chunk", "scanner/floor", "scanner−no-op µs/chunk"], rows)
    print()
    for name, (scan_ms, floor_ms) in per_mb.items():
        print(f"CPU per streamed MB, {name}: scanner {scan_ms:.2f} ms, floor {floor_ms:.3f} ms")
    print()
    print("whole JSON answers: from_json_answer vs json.loads alone")
    C.print_table(["shape", "KB", "from_json_answer µs", "json.loads µs", "ratio"], json_rows)
    print()
    if wrong:
        print(f"check: the usage read was WRONG for: {', '.join(wrong)}")
        return 1
    print("check: every stream and answer read the usage written into it: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
