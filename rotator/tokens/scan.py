"""Reading the usage of a streamed (SSE) answer from its chunks as they pass, without
holding the stream back or buffering it.

`UsageScanner` sees the chunks mitmproxy hands a `response.stream` callable, in order,
split anywhere (mid-event, mid-line, mid-UTF-8). Only an event with a key `"usage"`
whose value is an object can carry usage, so a chunk costs one `bytes.find` for
`"usage"` (with its quotes: in a JSON string a quote is escaped, so a text delta that
writes "usage" never matches) plus a few bytes of bookkeeping; only a match is looked
at further: its event is found by its blank lines (every raw CR or LF in an SSE stream
ends a line, since JSON escapes them), its `data:` lines are joined and parsed as JSON,
and the figures are taken when the event is the right one:

- Anthropic shape: `message_start`'s `message.usage` (input_tokens,
  cache_read_input_tokens, cache_creation_input_tokens) and `message_delta`'s `usage`
  (output_tokens: the last one wins; input-side figures it repeats count when larger,
  as Anthropic's cumulative figures are).
- OpenAI shape: a `data: {...}` chunk's top-level `usage`, or (Kimi) its choice's
  `usage`; the last one wins. `data: [DONE]` and everything else is never parsed.

Bounds: what is kept between chunks is the stream's last `max_event_bytes` to twice
that (references to its chunks, not copies) and at most one candidate event of up to
`max_event_bytes` (64 KB by default; usage events are a few hundred bytes): at most
three times `max_event_bytes` whatever the stream does. A candidate event larger than
that is skipped, not read.

A stream cut short counts what Kimi reported before the cut: in the Anthropic shape the
input figures of `message_start` and the latest output figure (`message_start`'s own
placeholder when no `message_delta` came), so a lower bound; in the OpenAI shape,
whose usage comes only at the end, nothing (None). `complete` says whether the final
figures were read. An event still open when the stream ends counts when its JSON is whole.

The chunks are read as they are: mitmproxy hands a stream callable the body as sent,
still in its content coding, so a compressed stream (`content-encoding: gzip`) holds no
readable "usage" and counts nothing; decoding it is the caller's choice.
"""

from __future__ import annotations

import enum
import re

from rotator.tokens.usage import (
    CACHE_READ_TOKENS, CACHE_WRITE_TOKENS, INPUT_TOKENS, OUTPUT_TOKENS, Shape, Usage, anthropic_counts,
    load_json, openai_usage_in,
)

NEEDLE = b'"usage"'
MAX_EVENT_BYTES = 64 * 1024
# Every blank line (two line ends in a row: LF LF, CR CR, CRLF CRLF, LF CRLF, CRLF LF,
# …) holds one of these pairs, and a single line end (LF, CR, CRLF) holds none.
_BLANK = re.compile(rb"\n\n|\r\r|\n\r")
_BLANK_PAIRS = (b"\n\n", b"\r\r", b"\n\r")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# An event of one data line, after an optional name line (a field's one leading space
# is not part of its value); any other form is read line by line.
_SIMPLE_EVENT = re.compile(rb"(?:event: ?([^\r\n:]*)(?:\r\n|\r|\n))?data: ?([^\r\n]*)")
_AFTER_KEY = re.compile(rb"[ \t]*(:[ \t]*)?")
_BOM = b"\xef\xbb\xbf"
_LINE_END_BYTES = (0x0A, 0x0D)
_OPEN_BRACE = 0x7B
_SPACE_OR_LINE_END = b" \t\r\n"
_NEAR = 2048  # an event's start is looked for this far back first
_MAX_KEPT_PIECES = 256  # small chunks kept are joined past this many
_INPUT_SIDE = (INPUT_TOKENS, CACHE_READ_TOKENS, CACHE_WRITE_TOKENS)


class _State(enum.Enum):
    SCAN = "looking for usage"
    PENDING = "reading a candidate event"
    SKIP = "skipping an oversized event"
    ENDED = "the stream ended"


def _last_blank_end(buf: bytes) -> int:
    """Where the last blank line in `buf` ends, or -1: searched from the end in growing
    windows, as the event start is usually a few hundred bytes back."""
    hi, step = len(buf), 512
    while hi > 0:
        lo = max(0, hi - step)
        found = max(buf.rfind(pair, lo, hi) for pair in _BLANK_PAIRS)
        if found >= 0:
            return found + 2
        hi, step = lo + 1 if lo > 0 else 0, step * 4
    return -1


def _could_hold_object(chunk: bytes, after: int) -> bool:
    """Whether the `"usage"` ending at `after` may be a key whose value is an object (not
    `"usage": null`, not the string "usage" as a value); True when the chunk ends first."""
    two = chunk[after:after + 2]
    if two == b":{" or two == b": " and chunk[after + 2:after + 3] == b"{":  # compact, or json.dumps'
        return True
    if len(two) == 2 and two[0] == 0x3A and two[1] not in _SPACE_OR_LINE_END:  # ":null", ":0", …
        return False
    m = _AFTER_KEY.match(chunk, after)
    end = m.end()  # type: ignore[union-attr]
    if end >= len(chunk):
        return True
    c = chunk[end]
    if c in _LINE_END_BYTES:  # a data line split here: the event will tell
        return True
    return m.group(1) is not None and c == _OPEN_BRACE  # type: ignore[union-attr]


class UsageScanner:
    """feed() it every chunk of one streamed answer of `shape`, b"" at the end;
    result() is the usage read so far (None: none)."""

    __slots__ = ("shape", "_final", "events_read", "events_skipped", "_limit", "_state", "_scanning",
                 "_kept", "_kept_len", "_dropped", "_carry", "_pending", "_pending_start",
                 "_skip_last", "_counts", "_openai", "_most_kept")

    def __init__(self, shape: Shape, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.shape = shape
        self._final = False  # the final figures were read (message_delta; OpenAI's usage)
        self.events_read = 0  # candidate events parsed
        self.events_skipped = 0  # candidate events larger than max_event_bytes, not read
        self._limit = max(16, max_event_bytes)
        self._most_kept = 2 * self._limit  # kept bytes are trimmed past this
        self._state = _State.SCAN
        self._scanning = True  # state is SCAN: the fast path applies
        self._kept: list[bytes] = []  # the chunks before this one: the stream's last ≥ limit bytes
        self._kept_len = 0  # their length
        self._dropped = 0  # the stream's bytes before them
        self._carry = b""  # the stream's last 6 bytes (SCAN), for a "usage" split across chunks
        self._pending = bytearray()  # the candidate event read so far (PENDING)
        self._pending_start = 0  # its offset in the stream
        self._skip_last = b""  # the last byte of the previous chunk (SKIP)
        self._counts: dict[str, int] = {}  # Anthropic: the figures read
        self._openai: Usage | None = None  # OpenAI: the last usage read

    # -- reading -----------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """The next chunk of the stream; b"" when it ended."""
        if self._scanning and chunk:
            buf = self._carry + chunk  # "usage" may be split across chunks
            i = buf.find(NEEDLE)
            if i >= 0:
                self._candidate(chunk, buf, i)
                return
            self._carry = buf[-6:]  # the bulk: nothing here
            kept = self._kept
            kept.append(chunk)
            self._kept_len += len(chunk)
            if self._kept_len > self._most_kept or len(kept) > _MAX_KEPT_PIECES:
                self._trim()
        elif not chunk:
            self._end()
        elif self._state is not _State.ENDED:
            self._feed(chunk, chunk, 0)

    def result(self) -> Usage | None:
        """The usage read so far (an event still open counts when its JSON is whole);
        None when no usage was read."""
        if self._state is _State.PENDING:  # read it into a copy: the stream may go on
            copy = UsageScanner(self.shape)
            copy._counts, copy._openai = dict(self._counts), self._openai
            copy._dispatch(bytes(self._pending), self._pending_start == 0)
            return copy.result()
        if self.shape is Shape.OPENAI:
            return self._openai
        return Usage.from_anthropic(self._counts) if self._counts else None

    @property
    def complete(self) -> bool:
        """Whether the figures read are the answer's final ones: OpenAI's usage; in the
        Anthropic shape a message_delta's, and the input figures (message_start's)."""
        return self._final and (self.shape is Shape.OPENAI or INPUT_TOKENS in self._counts)

    @property
    def held_bytes(self) -> int:
        """The stream's bytes this scanner holds on to (kept chunks, a candidate event)."""
        return self._kept_len + len(self._pending) + len(self._carry)

    def _candidate(self, chunk: bytes, buf: bytes, i: int) -> None:
        """A chunk in SCAN with "usage" at `i` of `buf` (the stream's last bytes before
        the chunk, then the chunk)."""
        while i >= 0 and not _could_hold_object(buf, i + len(NEEDLE)):  # e.g. "usage":null
            i = buf.find(NEEDLE, i + len(NEEDLE))
        if i >= 0 and not self._read_within(buf, i):  # an event not whole in buf
            self._feed(chunk, buf, i)
            return
        self._carry = buf[-6:]
        kept = self._kept
        kept.append(chunk)
        self._kept_len += len(chunk)
        if self._kept_len > self._most_kept or len(kept) > _MAX_KEPT_PIECES:
            self._trim()

    def _read_within(self, buf: bytes, i: int) -> bool:
        """The fast path for a candidate "usage" at `i` of `buf` (the stream's last bytes
        before the chunk, then the chunk): when its event, and every later candidate's,
        begins and ends within `buf` (or begins the stream), read them and say True; else
        read nothing and say False (the general path reads the chunk)."""
        at_start = not self._kept_len and not self._dropped  # buf is the stream so far
        limit, n = self._limit, len(buf)
        events: list[tuple[bytes, bool]] = []
        while i >= 0:
            s = max(buf.rfind(b"\n\n", 0, i), buf.rfind(b"\r\r", 0, i), buf.rfind(b"\n\r", 0, i)) + 2
            if s < 2 and not at_start:
                return False  # the event began before buf
            m = _BLANK.search(buf, i)
            if m is None:
                return False  # it ends in a later chunk
            end = m.start()
            start = s if s >= 2 else 0
            if end - start > limit:
                return False
            events.append((buf[start:end], start == 0 and at_start))
            i = buf.find(NEEDLE, m.end())
            while i >= 0 and not _could_hold_object(buf, i + len(NEEDLE)):
                i = buf.find(NEEDLE, i + len(NEEDLE))
            if i >= 0 and i + len(NEEDLE) >= n:
                return False  # a "usage" whose value the next chunk tells
        for event, first in events:
            self._dispatch(event, first)
        return True

    # -- the states --------------------------------------------------------------------

    def _feed(self, chunk: bytes, buf: bytes, pos: int) -> None:
        """A chunk read in another state than SCAN (buf is the chunk, pos 0), or one with
        a candidate "usage" at `pos` of `buf` (the last bytes before it, then it)."""
        start = self._dropped + self._kept_len - (len(buf) - len(chunk))  # buf's offset in the stream
        n = len(buf)
        while pos < n:
            if self._state is _State.SCAN:
                pos = self._scan(buf, start, pos)
            elif self._state is _State.PENDING:
                pos = self._extend(buf, pos)
            else:
                pos = self._skip(buf, pos)
        self._scanning = self._state is _State.SCAN
        self._carry = buf[-6:] if self._scanning else b""
        self._kept.append(chunk)
        self._kept_len += len(chunk)
        self._trim()

    def _scan(self, buf: bytes, start: int, pos: int) -> int:
        while True:
            i = buf.find(NEEDLE, pos)
            if i < 0:
                return len(buf)
            pos = i + len(NEEDLE)
            if _could_hold_object(buf, pos):
                return self._hit(buf, start, start + i)

    def _hit(self, buf: bytes, start: int, at: int) -> int:
        """A candidate "usage" at stream offset `at`: find its event's start."""
        lo = max(self._dropped, at - self._limit)
        near = max(lo, at - _NEAR)
        cut = _last_blank_end(self._bytes(near, at, buf, start))  # usually found here
        if cut >= 0:
            s = near + cut
        else:
            cut = _last_blank_end(self._bytes(lo, near + 1, buf, start)) if near > lo else -1
            if cut < 0 and lo != 0:  # it began more than the limit back
                self.events_skipped += 1
                self._state, self._skip_last = _State.SKIP, b""
                return at - start
            s = lo + max(cut, 0)
        self._pending = bytearray(self._bytes(s, at, buf, start))
        self._pending_start = s
        self._state = _State.PENDING
        return at - start

    def _extend(self, buf: bytes, pos: int) -> int:
        """Read the candidate event on to its end (a blank line) or its limit; only the
        bytes up to its end are copied."""
        pending, room = self._pending, self._limit - len(self._pending)
        if pos == 0 and pending[-1:] in (b"\n", b"\r") and _BLANK.match(pending[-1:] + buf[:1]):
            del pending[-1:]
            return self._read(1)
        m = _BLANK.search(buf, pos, pos + room + 1)
        if m is not None and m.start() - pos <= room:
            pending += buf[pos:m.start()]
            return self._read(m.end())
        pending += buf[pos:pos + room]
        if len(pending) < self._limit:
            return len(buf)
        self.events_skipped += 1
        self._skip_last = bytes(pending[-1:])
        self._pending = bytearray()
        self._state = _State.SKIP
        return pos + room

    def _read(self, resume: int) -> int:
        """The candidate event is whole: read it, look on from `resume`."""
        event, self._pending = bytes(self._pending), bytearray()
        self._state = _State.SCAN
        self._dispatch(event, self._pending_start == 0)
        return resume

    def _skip(self, buf: bytes, pos: int) -> int:
        """Pass over an oversized event to its end."""
        if pos == 0 and self._skip_last and _BLANK.match(self._skip_last + buf[:1]):
            self._state = _State.SCAN
            return 1
        m = _BLANK.search(buf, pos)
        if m is not None:
            self._state = _State.SCAN
            return max(pos, m.end())
        self._skip_last = buf[-1:]
        return len(buf)

    def _end(self) -> None:
        if self._state is _State.PENDING:
            self._dispatch(bytes(self._pending), self._pending_start == 0)
        self._state, self._scanning = _State.ENDED, False
        self._pending = bytearray()
        self._kept.clear()
        self._kept_len = 0
        self._carry = b""

    # -- the bytes kept ------------------------------------------------------------------

    def _trim(self) -> None:
        """Keep (references to) the stream's last `limit` bytes, or a little more: drop
        the chunks before them; many small ones, or one huge one, become one piece."""
        kept, limit = self._kept, self._limit
        drop, total = 0, self._kept_len
        while total - len(kept[drop]) >= limit:
            total -= len(kept[drop])
            drop += 1
        if drop:
            del kept[:drop]
            self._dropped += self._kept_len - total
            self._kept_len = total
        if total > 2 * limit or len(kept) > _MAX_KEPT_PIECES:
            joined = b"".join(kept)[-limit:]
            kept[:] = [joined]
            self._dropped += total - len(joined)
            self._kept_len = len(joined)

    def _bytes(self, a: int, b: int, buf: bytes, start: int) -> bytes:
        """The stream's bytes from offset a to b, from `buf` (at `start`) and what is kept
        (walked from the newest chunk back, as far as `a`)."""
        parts = [buf[max(0, a - start):b - start]] if b > start else []
        end = self._dropped + self._kept_len  # where the kept chunks end
        for data in reversed(self._kept):
            offset = end - len(data)
            lo, hi = max(a, offset), min(b, end, start)  # buf's own bytes come from buf
            if hi > lo:
                parts.append(data[lo - offset:hi - offset])
            if offset <= a:
                break
            end = offset
        parts.reverse()
        return b"".join(parts)

    # -- one event -----------------------------------------------------------------------

    def _dispatch(self, event: bytes, at_stream_start: bool) -> None:
        """Parse one candidate event (its lines) and take its figures."""
        if at_stream_start and event.startswith(_BOM):
            event = event[len(_BOM):]
        simple = _SIMPLE_EVENT.fullmatch(event)  # the usual form: one data line, maybe a name
        if simple is not None:
            self._take(simple.group(2), simple.group(1) or b"")
            return
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
        if data:
            self._take(b"\n".join(data), name)

    def _take(self, data: bytes, name: bytes) -> None:
        """Take the figures of one event's data (its `data:` lines joined), named `name`."""
        self.events_read += 1
        document = load_json(data)
        if not isinstance(document, dict):
            return
        if self.shape is Shape.OPENAI:
            usage = openai_usage_in(document)
            if usage is not None:
                self._openai, self._final = usage, True
            return
        kind = document.get("type")
        if not isinstance(kind, str):
            kind = name.decode("utf-8", "replace")
        if kind == "message_start":
            message = document.get("message")
            counts = anthropic_counts(message.get("usage") if isinstance(message, dict) else None,
                                      required=(INPUT_TOKENS,))
            if counts is not None:
                self._counts.update(counts)
        elif kind == "message_delta":
            counts = anthropic_counts(document.get("usage"), required=(OUTPUT_TOKENS,))
            if counts is not None:
                for figure in _INPUT_SIDE:  # cumulative: a repeat counts when larger
                    if figure in counts:
                        self._counts[figure] = max(counts[figure], self._counts.get(figure, 0))
                self._counts[OUTPUT_TOKENS] = counts[OUTPUT_TOKENS]
                self._final = True


def from_event_stream(body: bytes, shape: Shape, max_event_bytes: int = MAX_EVENT_BYTES) -> Usage | None:
    """The usage of a whole SSE answer held in memory (e.g. one that was buffered)."""
    scanner = UsageScanner(shape, max_event_bytes)
    scanner.feed(body)
    scanner.feed(b"")
    return scanner.result()
