"""Conversation affinity's per-request cost and memory, in process, no network.

What a request costs to find its conversation (rotator.conversations.ids) for a
50 KB and a 500 KB body, shaped as the real clients send them:
  header (Claude Code)     X-Claude-Code-Session-Id among Claude Code's 22 headers
  header (OpenCode)        x-session-affinity / x-session-id
  body prompt_cache_key    Kimi CLI: no session header, the key after messages, tools after it
                           (a later turn, and a first turn: the depth count not remembered)
  body metadata.user_id    Claude Code's body without its header (the fallback)
  miss                     a script's request: no header, neither field
  key before messages      no client known does this: the longest read after a key (a body
                           longer than MAX_TAIL after the key names no conversation)
and, for scale, `json.loads` of the whole body (what the byte search avoids) and
mitmproxy's `Headers.get` for the same five names (what the one pass over the header
fields avoids). Then the pin table (rotator.conversations.pins): a turn of a known
conversation, a new conversation over 3 and 100 keys, and memory per 1,000 live
conversations (tracemalloc; ids as the clients send them).

Figures are µs per call: the median of R timeit runs of N calls each. Nothing here is a
target; the script asserts only that the scan found what it should.

    python bench/conversation_ids.py [--quick]
"""

from __future__ import annotations

import gc
import json
import sys
import timeit
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _common as C  # noqa: E402
from mitmproxy.http import Headers  # noqa: E402
from rotator.conversations import ids  # noqa: E402
from rotator.conversations.pins import PinTable  # noqa: E402

SIZES_KB = (50, 500)
SESSION = "0b7c6a1e-59f4-4b8e-9a51-2f8d3c1e7a90"
T0 = 1_700_000_000_000

BASE_HEADERS = [
    ("host", "api.kimi.com"), ("connection", "keep-alive"), ("accept", "application/json"),
    ("x-stainless-retry-count", "0"), ("x-stainless-timeout", "600"), ("x-stainless-lang", "js"),
    ("x-stainless-package-version", "0.55.1"), ("x-stainless-os", "Linux"), ("x-stainless-arch", "x64"),
    ("x-stainless-runtime", "node"), ("x-stainless-runtime-version", "v22.15.0"),
    ("anthropic-dangerous-direct-browser-access", "true"), ("anthropic-version", "2023-06-01"),
    ("x-api-key", "sk-kimi-placeholder"), ("x-app", "cli"), ("content-type", "application/json"),
    ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14"),
    ("accept-language", "*"), ("sec-fetch-mode", "cors"), ("accept-encoding", "gzip, deflate"),
    ("content-length", "51200"),
]


def header_fields(*extra: tuple[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((n.encode(), v.encode()) for n, v in (*BASE_HEADERS, *extra))


TEXT = 'Edit "src/app.py": replace `if x["k"] > 0:` with {"a": [1, 2]} \\ C:\\dir\n' * 20
TOOLS = [{"type": "function", "function": {"name": f"tool_{i}", "description": "Does a thing.\n" * 40,
          "parameters": {"type": "object", "properties": {"arg": {"type": "string"}}}}} for i in range(20)]


def dump(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def sized(kb: int, shape: Callable[[list[dict]], dict]) -> bytes:
    """The body of `shape` with as many turns as bring it to about `kb` KB."""
    def body(turns: int) -> bytes:
        return dump(shape([{"role": ("user", "assistant")[i % 2], "content": TEXT} for i in range(turns)]))

    low, high = 0, 1
    while len(body(high)) < kb * 1024:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if len(body(mid)) < kb * 1024 else (low, mid)
    return body(high)


def bodies(kb: int) -> dict[str, bytes]:
    """Kimi CLI's shape (the key after messages, tools after it, as the openai SDK orders
    them), Claude Code's (metadata after messages and tools), a plain one with neither,
    and a key before the messages (no client known does it: the longest scan)."""
    user_id = json.dumps({"device_id": "f" * 64, "account_uuid": "", "session_id": SESSION})
    return {
        "kimi": sized(kb, lambda m: {"messages": m, "model": "kimi-for-coding", "max_tokens": 32000,
                                     "prompt_cache_key": SESSION, "stream": True,
                                     "stream_options": {"include_usage": True}, "temperature": 0.6, "tools": TOOLS}),
        "claude": sized(kb, lambda m: {"model": "kimi-for-coding", "messages": m,
                                       "system": [{"type": "text", "text": "You are"}], "tools": TOOLS,
                                       "metadata": {"user_id": user_id}, "max_tokens": 32000, "stream": True}),
        "plain": sized(kb, lambda m: {"model": "kimi-for-coding", "messages": m, "tools": TOOLS, "stream": True}),
        "first": sized(kb, lambda m: {"prompt_cache_key": SESSION, "model": "kimi-for-coding", "messages": m,
                                      "tools": TOOLS}),
    }


def per_call_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    gc.collect()
    runs = timeit.repeat(fn, number=number, repeat=repeat)
    return C.median(runs) / number * 1e6


def main() -> int:
    ap = C.parser(__doc__.splitlines()[0])
    quick = ap.parse_args().quick
    number, repeat = (200, 3) if quick else (2000, 7)
    C.print_header("conversation ids and pins: µs per request, memory",
                   [f"timing: median of {repeat} runs of {number} calls (fewer for json.loads)"])

    claude_h = header_fields(("user-agent", "claude-cli/2.1.332 (external, cli)"),
                             ("x-claude-code-session-id", SESSION))
    opencode_h = header_fields(("user-agent", "opencode/1.18.33"), ("x-session-affinity", "ses_5f1d2c3b4a5e"),
                               ("x-session-id", "ses_5f1d2c3b4a5e"))
    kimi_h = header_fields(("user-agent", "KimiCLI/1.51.0"))
    plain_h = header_fields(("user-agent", "python-httpx/0.27.0"))

    rows = []
    figures: dict[tuple[str, int], float] = {}
    for kb in SIZES_KB:
        b = bodies(kb)
        # (headers, body, what it names, whether it goes to /v1/messages: Anthropic's API)
        cases = {
            "header (Claude Code)": (claude_h, b["claude"], ids.Conversation(SESSION, "x-claude-code-session-id",
                                                                             ids.CLAUDE_CODE), True),
            "header (OpenCode)": (opencode_h, b["plain"], ids.Conversation("ses_5f1d2c3b4a5e", "x-session-affinity",
                                                                           ids.OPENCODE), True),
            "body prompt_cache_key (Kimi CLI)": (kimi_h, b["kimi"], ids.Conversation(
                SESSION, ids.BODY_PROMPT_CACHE_KEY, ids.KIMI_CLI), False),
            "body metadata.user_id (no header)": (kimi_h, b["claude"], ids.Conversation(
                SESSION, ids.BODY_METADATA_USER_ID, ids.KIMI_CLI), True),
            "miss (no id)": (plain_h, b["plain"], None, True),
            "key before messages (no client does)": (kimi_h, b["first"], None if len(b["first"]) > ids.MAX_TAIL
                                                     else ids.Conversation(SESSION, ids.BODY_PROMPT_CACHE_KEY,
                                                                           ids.KIMI_CLI), False),
        }
        for name, (fields, body, expected, messages_api) in cases.items():
            got = ids.conversation_of(fields, body, messages_api=messages_api)
            if got != expected:
                print(f"ERROR: {name} at {kb} KB found {got!r}, expected {expected!r}")
                return 1
            figures[name, kb] = per_call_us(
                lambda f=fields, bo=body, m=messages_api: ids.conversation_of(f, bo, messages_api=m), number, repeat)
            if name.startswith("body prompt_cache_key"):  # the depth count remembered above; a first turn counts
                first_turn = f"{name}, first turn"
                figures[first_turn, kb] = per_call_us(
                    lambda f=fields, bo=body: (ids.forget_depths(), ids.conversation_of(f, bo)), number, repeat)
        figures["json.loads of the whole body", kb] = per_call_us(lambda bo=b["kimi"]: json.loads(bo),
                                                                   max(5, number // 100), repeat)
        mitm = Headers(claude_h)
        names = ("x-claude-code-session-id", "x-session-affinity", "x-session-id", "session-id", "user-agent")
        figures["(mitmproxy Headers.get, 5 names)", kb] = per_call_us(
            lambda h=mitm: [h.get(n) for n in names], number, repeat)
        sizes = ", ".join(f"{k} {len(v) / 1024:.0f} KB" for k, v in b.items())
        tools = len(dump({"tools": TOOLS})) / 1024
        print(f"bodies at {kb} KB: {sizes}; the tools {tools:.0f} KB (after Kimi CLI's key)")
    print()
    print("µs per request to find the conversation (a later turn of Kimi CLI's finds its depth count remembered):")
    for name in dict.fromkeys(n for n, _ in figures):
        rows.append([name, *(f"{figures[name, kb]:.2f}" for kb in SIZES_KB)])
    C.print_table(["case", *(f"{kb} KB" for kb in SIZES_KB)], rows)
    print()
    for kb in SIZES_KB:
        whole = figures["json.loads of the whole body", kb]
        print(f"at {kb} KB: json.loads / body prompt_cache_key = {whole / figures['body prompt_cache_key (Kimi CLI)', kb]:.0f}×,"
              f" json.loads / miss = {whole / figures['miss (no id)', kb]:.0f}×")
    print()
    pins_figures(number, repeat)
    print()
    memory_figures()
    return 0


def pins_figures(number: int, repeat: int) -> None:
    print("µs per request in the pin table:")
    rows = []
    for keys_n in (3, 100):
        keys = [C.bench_key(i) for i in range(keys_n)]
        table = PinTable()
        cids = [str(uuid.UUID(int=i)) for i in range(1000)]
        for i, cid in enumerate(cids):
            table.pin(cid, keys[i % keys_n], T0)
        clock = iter(range(T0, T0 + 10**9))
        turn = lambda: table.pin_for(cids[500], next(clock))  # noqa: E731
        fresh = iter(range(10**9))

        def new() -> None:
            now = next(clock)
            cid = f"new-{next(fresh)}"
            table.pin(cid, table.choose_new(keys, now, preferred=keys[0]) or keys[0], now)

        rows.append([f"a turn of a known conversation ({keys_n} keys, 1,000 live)", f"{per_call_us(turn, number, repeat):.2f}"])
        rows.append([f"a new conversation: choose_new + pin ({keys_n} keys)", f"{per_call_us(new, number, repeat):.2f}"])
    C.print_table(["operation", "µs"], rows)


def memory_figures() -> None:
    for count in (1_000, 10_000):
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        table = PinTable()
        keys = [C.bench_key(i) for i in range(3)]
        for i in range(count):
            table.pin(str(uuid.uuid4()), keys[i % 3], T0 + i, client="claude-code")
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        per_1000 = (after - before) / count * 1000
        print(f"memory for {count:,} live conversations: {(after - before) / 1024:,.0f} KB"
              f" = {per_1000 / 1024:,.0f} KB per 1,000 (tracemalloc, ids included)")
        del table


if __name__ == "__main__":
    with C.watchdog(120):
        sys.exit(main())
