"""The figures a streamed answer reports, one SSE event at a time: an event's `data:`
lines joined (`event_data`), parsed, and its usage added up as its shape says (`Figures`).

- Anthropic shape: `message_start`'s `message.usage` (input_tokens,
  cache_read_input_tokens, cache_creation_input_tokens) and `message_delta`'s `usage`
  (output_tokens: the last one wins; input-side figures it repeats count when larger,
  as Anthropic's cumulative figures are). An event's kind is its data's `type`, else
  its `event:` name.
- OpenAI shape: a chunk's top-level `usage`, or (Kimi) its choice's `usage`; the last
  one wins.
Which events to hand over, and where they begin and end in a stream, is the scanner's
(rotator.tokens.scan).
"""

from __future__ import annotations

import re

from rotator.tokens.usage import (
    CACHE_READ_TOKENS, CACHE_WRITE_TOKENS, INPUT_TOKENS, OUTPUT_TOKENS, UNSURE, Shape, Usage, anthropic_counts,
    last_member_usage, load_json, openai_usage_in,
)

_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")
# The usual event, with LF line ends: an optional name line, then one data line (a
# field's one leading space is not part of its value); any other form is read line by line.
_HEAD = re.compile(rb"(?:event: ?([^\r\n:]*)\n)?data: ?")
_INPUT_SIDE = (INPUT_TOKENS, CACHE_READ_TOKENS, CACHE_WRITE_TOKENS)
_MESSAGE_START, _MESSAGE_DELTA = b"message_start", b"message_delta"
# Data that names one of the two kinds first, as Kimi and json.dumps write it.
_STARTS = (b'{"type":"message_start"', b'{"type": "message_start"')
_DELTAS = (b'{"type":"message_delta"', b'{"type": "message_delta"')
_OPENAI = Shape.OPENAI  # a module name: cheaper than the enum's, read on every event


def event_data(event: bytes, at_stream_start: bool) -> tuple[bytes, bytes] | None:
    """(data, name) of one SSE event (its lines, without the blank line that ends it):
    its `data:` lines joined by LF, and its `event:` name (b"" when none); None when it
    has no data line. A byte order mark starting the stream is not part of it."""
    if at_stream_start and event.startswith(_BOM):
        event = event[len(_BOM):]
    m = _HEAD.match(event)  # the usual form, read without a line loop
    if m is not None:
        at = m.end()
        if event.find(b"\n", at) < 0 and event.find(b"\r", at) < 0:
            return event[at:], m.group(1) or b""
    name, data = b"", []
    for line in _LINE_END.split(event):
        if not line or line[0] == 0x3A:  # empty, or a comment
            continue
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    return (b"\n".join(data), name) if data else None


class Figures:
    """The usage one streamed answer of `shape` reported so far, event by event."""

    __slots__ = ("shape", "final", "counts", "openai", "events_read")

    def __init__(self, shape: Shape) -> None:
        self.shape = shape
        self.final = False  # the final figures were read (message_delta; OpenAI's usage)
        self.counts: dict[str, int] = {}  # Anthropic: the figures read
        self.openai: Usage | None = None  # OpenAI: the last usage read
        self.events_read = 0  # events parsed

    def copy(self) -> Figures:
        other = Figures(self.shape)
        other.final, other.counts, other.openai, other.events_read = (
            self.final, dict(self.counts), self.openai, self.events_read)
        return other

    def result(self) -> Usage | None:
        if self.shape is _OPENAI:
            return self.openai
        return Usage.from_anthropic(self.counts) if self.counts else None

    @property
    def complete(self) -> bool:
        """Whether the figures read are the answer's final ones: OpenAI's usage; in the
        Anthropic shape a message_delta's, and the input figures (message_start's)."""
        return self.final and (self.shape is _OPENAI or INPUT_TOKENS in self.counts)

    def read_span(self, buf: bytes, begin: int, end: int, at_stream_start: bool, lf_only: bool) -> None:
        """The event `buf[begin:end]` (its lines; `lf_only`: buf holds no CR), read as `read`
        does, its usual form without copying it first."""
        if lf_only and not (at_stream_start and buf.startswith(_BOM, begin)):
            m = _HEAD.match(buf, begin, end)
            if m is not None:
                at = m.end()
                if buf.find(b"\n", at, end) < 0:
                    self.take(buf[at:end], m.group(1) or b"")
                    return
        self.read(buf[begin:end], at_stream_start)

    def read(self, event: bytes, at_stream_start: bool) -> None:
        """One event that may carry usage (its lines): parse it and take its figures."""
        found = event_data(event, at_stream_start)
        if found is not None:
            self.take(*found)

    def take(self, data: bytes, name: bytes) -> None:
        """Take the figures of one event's data (its `data:` lines joined), named `name`."""
        self.events_read += 1
        if self.shape is not _OPENAI:
            # As Kimi writes them: the type first, the usage last (its message's, in
            # message_start): only the usage object is parsed (rotator.tokens.usage).
            kind, depth = ((_MESSAGE_START, 2) if data.startswith(_STARTS)
                           else (_MESSAGE_DELTA, 1) if data.startswith(_DELTAS) else (b"", 0))
            if depth:
                usage = last_member_usage(data, depth)
                if usage is not UNSURE:
                    self._take_anthropic(kind, usage)
                    return
        document = load_json(data)
        if not isinstance(document, dict):
            return
        if self.shape is _OPENAI:
            usage = openai_usage_in(document)
            if usage is not None:
                self.openai, self.final = usage, True
            return
        kind = document.get("type")
        if not isinstance(kind, str):
            kind = name.decode("utf-8", "replace")
        if kind == "message_start":
            message = document.get("message")
            self._take_anthropic(_MESSAGE_START, message.get("usage") if isinstance(message, dict) else None)
        elif kind == "message_delta":
            self._take_anthropic(_MESSAGE_DELTA, document.get("usage"))

    def _take_anthropic(self, kind: bytes, usage: object) -> None:
        """The figures of a message_start's message usage or a message_delta's usage."""
        if kind == _MESSAGE_START:
            counts = anthropic_counts(usage, required=(INPUT_TOKENS,))
            if counts is not None:
                self.counts.update(counts)
            return
        counts = anthropic_counts(usage, required=(OUTPUT_TOKENS,))
        if counts is not None:
            for figure in _INPUT_SIDE:  # cumulative: a repeat counts when larger
                if figure in counts:
                    self.counts[figure] = max(counts[figure], self.counts.get(figure, 0))
            self.counts[OUTPUT_TOKENS] = counts[OUTPUT_TOKENS]
            self.final = True
