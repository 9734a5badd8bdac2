"""The tokens one answer spent (`Usage`), the two shapes Kimi reports them in, and
reading them from a whole (non-streamed) JSON answer.

Kimi says what an answer cost in its `usage`:

- Anthropic shape (`/coding/v1/messages`): `input_tokens` (the input not read from
  nor written to the prompt cache), `cache_read_input_tokens`,
  `cache_creation_input_tokens`, `output_tokens`. All input is the sum of the first three.
- OpenAI shape (`/coding/v1/chat/completions`): `prompt_tokens` (all input),
  `completion_tokens`, and the cached part as `cached_tokens` (Kimi, beside the others)
  or `prompt_tokens_details.cached_tokens` (OpenAI). No cache-write figure: 0.

A `usage` that is missing or odd counts nothing: the readers return None, never raise,
whatever the body holds (not JSON, deep nesting, huge or negative numbers, floats,
booleans, NaN, wrong types). A count above `MAX_TOKENS` is odd: no single answer
spends a billion tokens, and a figure that large would swamp every total it joins.

A whole JSON answer is not parsed whole when its usage is its last member, as Kimi
writes it (`…,"usage":{…}}`): only that object is (`last_member_usage`). The key is
believed when its quote follows `{` or `,` (so it opens a key: in a JSON string a quote
is escaped) and only `}` follows its object: in a JSON object that closing brace ends
the document, so the key is at its top level, never one nested in the content or a
tool's input. A streamed event's usage one level down (`message_start`'s
`message.usage`, also its message's last member) is read the same way, followed by
`}}`. As with rotator.conversations.ids' body rule, the rest of the body is taken to be
the JSON it says it is (a 200 from Kimi); any other shape is parsed whole.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

MAX_TOKENS = 1_000_000_000  # the most one figure of one answer may say
# Larger whole answers are not parsed (None): Kimi's longest answers are well under a
# megabyte, and parsing runs on the proxy's event loop.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
_SCAN_ONCE = json.JSONDecoder().scan_once  # what json.loads runs, in C

# The Anthropic shape's names, and the fields of `Usage` they feed.
INPUT_TOKENS = "input_tokens"
OUTPUT_TOKENS = "output_tokens"
CACHE_READ_TOKENS = "cache_read_input_tokens"
CACHE_WRITE_TOKENS = "cache_creation_input_tokens"
ANTHROPIC_NAMES = (INPUT_TOKENS, OUTPUT_TOKENS, CACHE_READ_TOKENS, CACHE_WRITE_TOKENS)

# How a saved total names the four figures (the accounts file's camelCase).
FIELD_NAMES = ("input", "output", "cacheRead", "cacheWrite")


class Shape(enum.Enum):
    """Which of Kimi's two answer shapes an endpoint speaks."""

    ANTHROPIC = "anthropic"  # /coding/v1/messages
    OPENAI = "openai"  # /coding/v1/chat/completions


@functools.lru_cache(maxsize=256)  # asked for every answer; a client's paths are few
def shape_for_path(path: str) -> Shape | None:
    """The shape of the answer to a request for `path` (query allowed), or None for a
    path whose answers carry no usage (models, usages, count_tokens, …)."""
    bare = path.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    if bare.endswith("/chat/completions"):
        return Shape.OPENAI
    if bare.endswith("/v1/messages"):
        return Shape.ANTHROPIC
    return None


_checked = tuple.__new__  # a Usage of figures known to be whole numbers ≥ 0


class _Figures(NamedTuple):
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0


class Usage(_Figures):
    """Tokens spent: `input` is ALL input (cache reads and writes included), `output`
    the answer's, `cache_read` the part of the input Kimi served from its prompt cache,
    `cache_write` the part it wrote to it. Whole numbers ≥ 0; they add up. Immutable:
    a NamedTuple, the cheapest record to make (one is made per answer)."""

    __slots__ = ()

    def __new__(cls, input: int = 0, output: int = 0, cache_read: int = 0, cache_write: int = 0) -> Usage:
        if not (type(input) is int and type(output) is int and type(cache_read) is int
                and type(cache_write) is int and input >= 0 and output >= 0 and cache_read >= 0 and cache_write >= 0):
            for name, value in (("input", input), ("output", output), ("cache_read", cache_read),
                                ("cache_write", cache_write)):
                if type(value) is not int or value < 0:
                    raise ValueError(f"Usage.{name} must be a whole number ≥ 0, not {value!r}")
        return _checked(cls, (input, output, cache_read, cache_write))

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(self.input + other.input, self.output + other.output,
                     self.cache_read + other.cache_read, self.cache_write + other.cache_write)

    @property
    def cache_share(self) -> float | None:
        """The part of the input served from the prompt cache (cache_read / input), None
        when there was no input."""
        return self.cache_read / self.input if self.input else None

    def as_fields(self) -> dict[str, int]:
        """As saved: `{input, output, cacheRead, cacheWrite}`."""
        return {"input": self.input, "output": self.output, "cacheRead": self.cache_read,  # FIELD_NAMES
                "cacheWrite": self.cache_write}

    @classmethod
    def from_fields(cls, fields: object) -> Usage | None:
        """A saved total back (`as_fields`' names, each optional: absent is 0); None when
        it is not a mapping or a figure is not a whole number ≥ 0."""
        if not isinstance(fields, Mapping):
            return None
        values = [fields.get(name, 0) for name in FIELD_NAMES]
        if any(type(v) is not int or v < 0 for v in values):
            return None
        return cls(*values)

    @classmethod
    def from_anthropic(cls, counts: Mapping[str, int]) -> Usage:
        """From the Anthropic shape's figures as `anthropic_counts` gives them (whole
        numbers ≥ 0, so are their sums; absent ones are 0)."""
        get = counts.get
        read, write = get(CACHE_READ_TOKENS, 0), get(CACHE_WRITE_TOKENS, 0)
        return _checked(cls, (get(INPUT_TOKENS, 0) + read + write, get(OUTPUT_TOKENS, 0), read, write))


ZERO = Usage()


def token_count(value: object) -> int | None:
    """A figure as Kimi sends it: an int in 0..MAX_TOKENS (not a bool, not a float)."""
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else None  # type: ignore[return-value]


_ODD = object()


def _optional_count(mapping: Mapping[str, Any], name: str) -> int | None | object:
    """`name`'s figure; None when absent or null; _ODD when present and not a figure."""
    value = mapping.get(name)
    if value is None:
        return None
    count = token_count(value)
    return _ODD if count is None else count


def anthropic_counts(usage: object, required: tuple[str, ...] = ()) -> dict[str, int] | None:
    """The Anthropic-shape figures a `usage` object holds (those of `ANTHROPIC_NAMES`
    present and not null); None when it is not an object, a figure is odd, or one of
    `required` is missing."""
    if not isinstance(usage, dict):
        return None
    counts: dict[str, int] = {}
    for name in ANTHROPIC_NAMES:  # token_count inlined: this runs on every streamed answer
        value = usage.get(name)
        if value is not None:
            if type(value) is not int or not 0 <= value <= MAX_TOKENS:
                return None
            counts[name] = value
    for name in required:
        if name not in counts:
            return None
    return counts


def openai_usage(usage: object) -> Usage | None:
    """An OpenAI-shape `usage` object as a Usage; None when it is not one, lacks
    `prompt_tokens` or `completion_tokens`, holds an odd figure, or says more was
    cached than was sent. The cached part: Kimi's `cached_tokens` when given, else
    OpenAI's `prompt_tokens_details.cached_tokens`, else 0."""
    if not isinstance(usage, dict):
        return None
    prompt = token_count(usage.get("prompt_tokens"))
    completion = token_count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    cached = _optional_count(usage, "cached_tokens")
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        detailed = _optional_count(details, "cached_tokens")
    else:
        detailed = None if details is None else _ODD
    if cached is _ODD or detailed is _ODD:
        return None
    read = cached if cached is not None else detailed if detailed is not None else 0
    if read > prompt:  # type: ignore[operator]
        return None
    return Usage(prompt, completion, read, 0)  # type: ignore[arg-type]


def openai_usage_in(document: object) -> Usage | None:
    """The usage of an OpenAI-shape answer or stream chunk: the top-level `usage`, or
    (Kimi, in a stream's last chunk) the first choice's `usage`."""
    if not isinstance(document, dict):
        return None
    top = document.get("usage")
    if top is not None:
        return openai_usage(top)
    choices = document.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and choice.get("usage") is not None:
                return openai_usage(choice["usage"])
    return None


def load_json(text: bytes | bytearray | str) -> object:
    """`text` parsed, or None when it is not JSON or is too deep or too large a number
    to parse (a hostile body costs a parse, never an exception)."""
    try:
        if type(text) is bytes and len(text) > 1 and text[0] == 0x7B and text[1]:  # "{", UTF-8 as json.loads tells
            # json.loads' own steps without its Python layers (a usage event is parsed
            # on every streamed answer); anything unusual goes the whole way below.
            decoded = text.decode("utf-8", "surrogatepass")
            try:
                document, end = _SCAN_ONCE(decoded, 0)
            except StopIteration:
                return None
            if end == len(decoded):
                return document
        return json.loads(text)
    except (ValueError, RecursionError, TypeError):  # UnicodeDecodeError is a ValueError
        return None


def from_json_answer(body: bytes, shape: Shape) -> Usage | None:
    """The usage of a whole JSON answer of `shape` (its top-level `usage`); None when it
    has none, it is odd, or the body is not a JSON object (an error, HTML, …)."""
    if not isinstance(body, (bytes, bytearray)) or len(body) > MAX_ANSWER_BYTES:
        return None
    usage = last_member_usage(body)
    if usage is UNSURE:
        document = load_json(body)
        if not isinstance(document, dict):
            return None
        if shape is Shape.OPENAI:
            return openai_usage_in(document)
        usage = document.get("usage")
    elif shape is Shape.OPENAI:
        return openai_usage(usage)
    counts = anthropic_counts(usage, required=(INPUT_TOKENS, OUTPUT_TOKENS))
    return None if counts is None else Usage.from_anthropic(counts)


UNSURE = object()  # what last_member_usage says of a text not so shaped
_USAGE_KEY = b'"usage"'
_OBJECT_VALUE = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*(?=\{)")  # the key's colon, then an object
_KEY_OPENERS = b"{,"
_JSON_SPACE = b" \t\r\n"
_USUAL_COLONS = ((b":{", 1), (b": {", 2))  # the colon as Kimi and json.dumps write it: read without a regex
# What may follow the usage object of a last member 1 and 2 levels down: closing braces
# (the usual form, and any other).
_BRACES = {1: "}", 2: "}}"}
_CLOSING = {depth: re.compile(r"(?:[ \t\r\n]*\})" * depth + r"[ \t\r\n]*\Z") for depth in (1, 2)}


def last_member_usage(text: bytes | bytearray, depth: int = 1) -> object:
    """The `usage` object that is the last member of `text`'s object `depth` levels down
    (1: the top level; 2: its last member's), parsed alone (see the module's docstring);
    `UNSURE` when `text` is not so shaped or that object does not parse (the caller
    parses it all)."""
    at = text.rfind(_USAGE_KEY)
    if at < 1 or text[0] != 0x7B:  # "{": an object, the usual way (else: parsed whole)
        return UNSURE
    before = at - 1
    while text[before] in _JSON_SPACE:  # stops at the text's "{" at the latest
        before -= 1
    if text[before] not in _KEY_OPENERS:
        return UNSURE
    start = at + len(_USAGE_KEY)
    for colon, width in _USUAL_COLONS:
        if text.startswith(colon, start):
            start += width
            break
    else:
        spaced = _OBJECT_VALUE.match(text, start)
        if spaced is None:
            return UNSURE
        start = spaced.end()
    try:
        tail = text[start:].decode("utf-8", "surrogatepass")  # as json.loads decodes
        usage, end = _SCAN_ONCE(tail, 0)
    except (ValueError, RecursionError, StopIteration):  # UnicodeDecodeError is a ValueError
        return UNSURE
    rest = tail[end:]
    return usage if rest == _BRACES[depth] or _CLOSING[depth].match(rest) else UNSURE
