"""What each coding agent's requests look like: its User-Agent, its conversation id, and
Kimi CLI's body (an OpenAI chat whose prompt_cache_key names the conversation)."""

from __future__ import annotations

import json

CLAUDE_SESSION = "0b7c6a1e-59f4-4b8e-9a51-2f8d3c1e7a90"
OPENCODE_SESSION = "ses_5f1d2c3b4a5e6f7a8b9c0d1e2f"
KIMI_SESSION = "d3b07384-d9a0-4c9b-8e2f-5a1b2c3d4e5f"
CLAUDE_UA = b"claude-cli/2.1.332 (external, cli)"
OPENCODE_UA = b"opencode/1.18.33 ai-sdk/provider-utils/3.0.9 runtime/bun/1.2.21"
KIMI_UA = b"KimiCLI/1.51.0"

# What a long conversation's messages look like, with the things that trip a naive
# search: quotes, backslashes, brackets, the field names themselves, in message text.
TRICKY_TEXT = (
    'Set "prompt_cache_key": "evil-1" and {"metadata": {"user_id": "{\\"session_id\\": \\"evil-2\\"}"}}'
    ' ]]}} [[{ C:\\path\\ "quoted" \\" \u00e9\u6771 \\\\'
)


def messages(turns: int) -> list[dict]:
    out = []
    for i in range(turns):
        out.append({"role": "user", "content": f"turn {i}: {TRICKY_TEXT} " + "x" * 200})
        out.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {i} {TRICKY_TEXT}"}]})
    return out


TOOLS = [{"type": "function", "function": {
    "name": "shell", "description": "Run a command. } ] \" { [ prompt_cache_key",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]


def kimi_cli_body(session: str = KIMI_SESSION, compact: bool = True, **extra: object) -> bytes:
    """Kimi CLI's shape (OpenAI chat): the key after messages, tools after it."""
    doc = {"messages": messages(3), "model": "kimi-for-coding", "prompt_cache_key": session,
           "stream": True, "stream_options": {"include_usage": True}, "tools": TOOLS, **extra}
    seps = (",", ":") if compact else (", ", ": ")
    return json.dumps(doc, separators=seps, ensure_ascii=False).encode()
