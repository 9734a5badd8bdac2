"""Which conversation a request belongs to: read from its headers, else from one
top-level field of its body found by a byte search (the body is never parsed whole).

What the real clients send (tests/test_conversation_ids.py holds their shapes):
- Claude Code: header `X-Claude-Code-Session-Id: <uuid>`; also `"metadata":
  {"user_id": "<a JSON string holding session_id>"}` in the body (the fallback here);
- OpenCode: headers `x-session-affinity: ses_…` and `x-session-id: ses_…`;
- Kimi CLI: `"prompt_cache_key": "<session uuid>"` in the body, after `messages`.
A request that names none of these belongs to no conversation (None): it follows the
strategy per request. Nothing is guessed from the prompt's text.

Of the two body fields, the one of the request's own API is read first: `metadata.user_id`
on Anthropic's Messages API (`/v1/messages`: Claude Code), `prompt_cache_key` on OpenAI's
chat completions (Kimi CLI); the other only when it is absent. No client sends both; the
order spares each client's requests a search of the whole body for the other's field.

The body rule. Bodies are 30–500 KB, so a field is found with `bytes.rfind` from the end
(both fields come after `messages`) and believed only if it is the top-level key:
1. the needle is the whole string token `"prompt_cache_key"` with an unescaped opening
   quote. Inside a JSON string every quote is escaped, so text in a message that
   mentions the field (`\\"prompt_cache_key\\": \\"x\\"`) never matches;
2. a colon follows it (whitespace allowed either side), so it is a key, not a value;
3. it is at depth 1: the JSON after the key, with its strings cut out, closes exactly
   one more bracket than it opens. A nested key of that name (in a tool's schema)
   closes two or more. This reads everything after the key (Kimi CLI sends its tools
   there: 10–60 KB), with C-speed bytes methods only (`replace`, `translate`, `split`,
   `count`), and only up to `MAX_TAIL` bytes: a key followed by more is not believed
   (no known client sends one; its cost would grow with the body), so the search
   itself reads only the body's last `MAX_TAIL` bytes. A conversation's turns repeat
   the same tail (its id, the same tools), so the count is remembered by the tail's
   hash (`DEPTH_MEMO_SIZE` of them): a later turn pays one hash of the tail, far less
   than the count (the figures: bench/README.md);
4. its value is read from a small window only: a string of at most 1,024 bytes
   (`prompt_cache_key`), an object of at most 4 KB (`metadata`).
A candidate that fails 1–3 sends the search further back; after `MAX_CANDIDATES` the
body counts as naming no conversation (so a hostile body costs at most
`MAX_CANDIDATES` × `MAX_TAIL` bytes of scanning). The rule assumes valid JSON: an
invalid one (which Kimi refuses anyway) can at worst be given a wrong id or none, which
changes only which pool key serves that request — the id is the client's own claim in
any case (a header can name any conversation), never a permission.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_ID_LENGTH = 128  # longer ids, or ids with other than printable ASCII, are hashed
HASH_PREFIX = "h:"
MAX_CANDIDATES = 4  # occurrences of a field's name tried, from the end, before giving up
MAX_TAIL = 256 * 1024  # bytes after a field's name read to tell it is top-level
DEPTH_MEMO_SIZE = 256  # tails whose depth count is remembered (a few KB of ints)
MAX_STRING_VALUE = 1024  # bytes of a prompt_cache_key value read
METADATA_WINDOW = 4096  # bytes after "metadata": in which its object must end

# The headers that name a conversation, best first (looked up case-insensitively).
HEADER_NAMES: tuple[bytes, ...] = (
    b"x-claude-code-session-id",  # Claude Code
    b"x-session-affinity",  # OpenCode
    b"x-session-id",  # OpenCode (the same value)
    b"session-id",
)
BODY_PROMPT_CACHE_KEY = "body:prompt_cache_key"
BODY_METADATA_USER_ID = "body:metadata.user_id"

CLAUDE_CODE = "claude-code"
OPENCODE = "opencode"
KIMI_CLI = "kimi-cli"
OTHER = "other"

_HEADER_RANK = {name: rank for rank, name in enumerate(HEADER_NAMES)}
_USER_AGENT = b"user-agent"
_CONTENT_ENCODING = b"content-encoding"
# The lengths of the names read: a header of another length is skipped unread.
_READ_SIZES = frozenset(len(name) for name in (*HEADER_NAMES, _USER_AGENT, _CONTENT_ENCODING))
_PLAIN_ID = re.compile(rb"[!-~]+")  # printable ASCII, no space
_KEY_MARK = b"sk-"  # what every API key shape starts with: such an id is hashed, never shown

_PROMPT_CACHE_KEY = b'"prompt_cache_key"'
_METADATA = b'"metadata"'
# What a depth count reads of JSON text once escapes are gone: quotes and brackets only.
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"{}[]')
_COLON = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_PLAIN_STRING = re.compile(rb'"([^"\\\x00-\x1f]{1,%d})"' % MAX_STRING_VALUE)  # no escapes: the usual
_STRING_VALUE = re.compile(rb'"((?:[^"\\\x00-\x1f]|\\.){1,%d})"' % MAX_STRING_VALUE)
_LEGACY_SESSION = re.compile(r"_session_([0-9A-Za-z-]{8,64})$")  # user_…_account_…_session_<uuid>
_DECODER = json.JSONDecoder()
# hash(tail) -> _closes(tail), oldest first. bytes hashes are SipHash with a per-process
# seed, so a body cannot be made to collide with another on purpose; a chance collision
# (~256 in 2**64) would misjudge one body's depth, i.e. its affinity, nothing else.
_depth_memo: dict[int, int] = {}
# What clean_id and client_of said for the last `MEMO_SIZE` values they were given.
MEMO_SIZE = 256
_clean_memo: dict[bytes, str] = {}
_client_memo: dict[bytes, str] = {}
_session_memo: dict[str, str] = {}  # metadata.user_id -> the session id found in it
MEMO_KEY_MOST = 1024  # longer values are not remembered


@dataclass(frozen=True, slots=True)
class Conversation:
    """A request's conversation: its id (at most `MAX_ID_LENGTH` printable ASCII
    characters), where the id was read (a header's name in lower case, or
    `BODY_PROMPT_CACHE_KEY` / `BODY_METADATA_USER_ID`), and the client by User-Agent."""

    id: str
    source: str
    client: str


def conversation_of(
    headers: Iterable[tuple[bytes, bytes]], body: bytes | None, *, messages_api: bool = False
) -> Conversation | None:
    """The conversation a request names, or None.

    `headers`: (name, value) pairs as sent, e.g. mitmproxy's `request.headers.fields`
    (one pass over them; `Headers.get` would scan them once per name). `body`: the
    request's bytes as sent (`request.raw_content`), not read when the headers name a
    content coding (an encoded body). `messages_api`: the request is for Anthropic's
    Messages API, whose own body field is read first (`id_in_body`)."""
    best_rank = len(HEADER_NAMES)
    best = b""
    agent = b""
    for name, value in headers:
        if len(name) not in _READ_SIZES:  # most names: no lowering, no look-up
            continue
        lowered = name.lower()
        rank = _HEADER_RANK.get(lowered)
        if rank is not None:
            if rank < best_rank and value.strip():
                best_rank, best = rank, value
        elif lowered == _USER_AGENT:
            agent = value
        elif lowered == _CONTENT_ENCODING:
            body = None
    if best_rank < len(HEADER_NAMES):
        return Conversation(clean_id(best), HEADER_NAMES[best_rank].decode("ascii"), client_of(agent))
    if body:
        found = id_in_body(body, messages_api=messages_api)
        if found is not None:
            return Conversation(found[0], found[1], client_of(agent))
    return None


def clean_id(raw: bytes) -> str:
    """`raw` (stripped) as an id: itself when it is short printable ASCII, else a hash
    of it (`h:` and 24 hex digits), so any value maps to one short printable id. An id
    shaped like an API key is hashed too: ids are shown on the status page."""
    cleaned = _clean_memo.get(raw)  # a conversation's turns name it again and again
    if cleaned is None:
        stripped = raw.strip()
        if len(stripped) <= MAX_ID_LENGTH and _PLAIN_ID.fullmatch(stripped) is not None and _KEY_MARK not in stripped:
            cleaned = stripped.decode("ascii")
        else:
            cleaned = HASH_PREFIX + hashlib.blake2b(stripped, digest_size=12).hexdigest()
        if len(raw) <= 2 * MAX_ID_LENGTH:
            _remember(_clean_memo, raw, cleaned)
    return cleaned


def client_of(user_agent: bytes) -> str:
    """The client kind, by User-Agent, for display only."""
    kind = _client_memo.get(user_agent)  # a client sends the same one every time
    if kind is None:
        agent = user_agent.lower()
        if b"claude-cli" in agent or b"claude-code" in agent:
            kind = CLAUDE_CODE
        elif b"opencode" in agent:
            kind = OPENCODE
        elif b"kimicli" in agent or b"kimi-cli" in agent or b"kimi_cli" in agent:
            kind = KIMI_CLI
        else:
            kind = OTHER
        if len(user_agent) <= 1024:
            _remember(_client_memo, user_agent, kind)
    return kind


def _remember(memo: dict[Any, str], raw: Any, value: str) -> None:
    """Keep `value` for `raw` in `memo`, forgetting the oldest past `MEMO_SIZE`."""
    if len(memo) >= MEMO_SIZE:
        del memo[next(iter(memo))]
    memo[raw] = value


def id_in_body(body: bytes, *, messages_api: bool = False) -> tuple[str, str] | None:
    """(id, source) from the body's top-level `prompt_cache_key`, else from the session
    in its top-level `metadata.user_id` (with `messages_api`: the other way round); None
    if it has neither. A field that is there but names no id ends the search (None)."""
    for quoted_name, value_at, source in _MESSAGES_API_ORDER if messages_api else _CHAT_ORDER:
        at = top_level_value(body, quoted_name)
        if at is not None:
            value = value_at(body, at)
            return None if value is None else (value, source)
    return None


def top_level_value(body: bytes, quoted_name: bytes) -> int | None:
    """Where the value of the top-level key `quoted_name` (with its quotes) starts: the
    last occurrence that passes the module's rule, among the last `MAX_CANDIDATES`."""
    start = max(0, len(body) - MAX_TAIL - len(quoted_name))  # a key followed by more is not believed
    at = body.rfind(quoted_name, start)
    tried = 1
    while at >= 0:
        if not _escaped(body, at):
            after = at + len(quoted_name)
            colon = _COLON.match(body, after)
            if colon is not None and _closes_remembered(body[after:]) == 1:
                return colon.end()
        if tried == MAX_CANDIDATES:
            return None
        tried += 1
        at = body.rfind(quoted_name, start, at)
    return None


def forget_depths() -> None:
    """Forget the remembered depth counts (for measuring a conversation's first turn)."""
    _depth_memo.clear()


def _escaped(body: bytes, at: int) -> bool:
    """Whether the quote at `at` is escaped (an odd number of backslashes before it)."""
    i = at
    while i > 0 and body[i - 1] == 0x5C:
        i -= 1
    return (at - i) % 2 == 1


def _closes_remembered(tail: bytes) -> int:
    """`_closes(tail)`, remembered for the last `DEPTH_MEMO_SIZE` tails."""
    tail_hash = hash(tail)
    closes = _depth_memo.get(tail_hash)
    if closes is None:
        closes = _closes(tail)
        if len(_depth_memo) >= DEPTH_MEMO_SIZE:
            del _depth_memo[next(iter(_depth_memo))]
        _depth_memo[tail_hash] = closes
    return closes


def _closes(tail: bytes) -> int:
    """How many more brackets the JSON text `tail` (which starts outside any string)
    closes than it opens, counting none inside strings."""
    if b"\\" in tail:
        # escaped backslashes first (so that \\" stays a closing quote), then escaped
        # quotes; the escapes left (\n, \u…) hold no quote or bracket
        tail = tail.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = tail.translate(None, _NOT_STRUCTURE)  # a pass in C; a few bytes per string
    outside = b"".join(structure.split(b'"')[::2])
    return outside.count(b"}") + outside.count(b"]") - outside.count(b"{") - outside.count(b"[")


def _string_at(body: bytes, at: int) -> str | None:
    """The id in the JSON string starting at `at`; None if it is no string, is empty,
    or is longer than `MAX_STRING_VALUE` bytes."""
    m = _PLAIN_STRING.match(body, at) or _STRING_VALUE.match(body, at)
    if m is None:
        return None
    raw = m.group(1)
    if b"\\" in raw:
        try:
            raw = json.loads(m.group(0)).encode("utf-8", "surrogatepass")
        except ValueError:
            return None
    return clean_id(raw) if raw.strip() else None


def _session_in_metadata(body: bytes, at: int) -> str | None:
    """The session id in the metadata object at `at`: its `user_id` is a JSON string
    holding `session_id` (Claude Code 2.x), or `user_…_session_<uuid>` (older)."""
    if at >= len(body) or body[at] != 0x7B:  # "{"
        return None
    window = body[at:at + METADATA_WINDOW].decode("utf-8", "replace")
    try:
        metadata, _ = _DECODER.scan_once(window, 0)  # raw_decode's own step: the window starts with "{"
    except (StopIteration, ValueError, RecursionError):  # not JSON, or longer than the window
        return None
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str):
        return None
    found = _session_memo.get(user_id)  # a conversation's turns send the same user_id
    if found is None:
        found = _session_in_user_id(user_id)
        if found is not None and len(user_id) <= MEMO_KEY_MOST:
            _remember(_session_memo, user_id, found)
    return found


def _session_in_user_id(user_id: str) -> str | None:
    session: object = None
    if user_id.lstrip().startswith("{"):
        try:
            inner = json.loads(user_id)
        except ValueError:
            return None
        session = inner.get("session_id") if isinstance(inner, dict) else None
    else:
        legacy = _LEGACY_SESSION.search(user_id)
        session = legacy.group(1) if legacy else None
    if not isinstance(session, str) or not session.strip():
        return None
    return clean_id(session.encode("utf-8", "surrogatepass"))


# The body fields in the order id_in_body reads them: (name, reader of its value, source).
_PROMPT_CACHE_KEY_FIELD = (_PROMPT_CACHE_KEY, _string_at, BODY_PROMPT_CACHE_KEY)
_METADATA_FIELD = (_METADATA, _session_in_metadata, BODY_METADATA_USER_ID)
_CHAT_ORDER = (_PROMPT_CACHE_KEY_FIELD, _METADATA_FIELD)
_MESSAGES_API_ORDER = (_METADATA_FIELD, _PROMPT_CACHE_KEY_FIELD)
