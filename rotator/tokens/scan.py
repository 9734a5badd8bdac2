"""Reading the usage of a streamed (SSE) answer from its chunks as they pass, without
holding the stream back or buffering it.

`UsageScanner` sees the chunks mitmproxy hands a `response.stream` callable, in order,
split anywhere (mid-event, mid-line, mid-UTF-8), and hands each on at once. A chunk
costs a reference kept: the chunks are scanned together, one `bytes.find` for `"usage"`
(with its quotes: in a JSON string a quote is escaped, so a text delta that writes
"usage" never matches) over all of them, when the kept bytes are trimmed, at the end, or
when the usage is asked for. Only an event with a key `"usage"` whose value is an object
can carry usage; only a match is looked at further: its event is found by its blank
lines (every raw CR or LF in an SSE stream ends a line, since JSON escapes them) and
read by rotator.tokens.figures, which says which events count and how.

Bounds: what is kept is the stream's last `max_event_bytes` to twice that (references
to its chunks, not copies) and at most one candidate event of up to `max_event_bytes`
(64 KB by default; usage events are a few hundred bytes): at most three times
`max_event_bytes` whatever the stream does. A candidate event larger than that is
skipped, not read.

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

from rotator.tokens.figures import Figures
from rotator.tokens.usage import Shape, Usage

NEEDLE = b'"usage"'
MAX_EVENT_BYTES = 64 * 1024
# Every blank line (two line ends in a row: LF LF, CR CR, CRLF CRLF, LF CRLF, CRLF LF,
# …) holds one of these pairs, and a single line end (LF, CR, CRLF) holds none.
_BLANK = re.compile(rb"\n\n|\r\r|\n\r")
_BLANK_PAIRS = (b"\n\n", b"\r\r", b"\n\r")
_OBJECT_VALUE = (b":{", b": {")  # a key's object value, compact or as json.dumps writes it
_AFTER_KEY = re.compile(rb"[ \t]*(:[ \t]*)?")
_LINE_END_BYTES = (0x0A, 0x0D)
_OPEN_BRACE = 0x7B
_SPACE_OR_LINE_END = b" \t\r\n"
_NEAR = 2048  # an event's start is looked for this far back first
_MAX_KEPT_PIECES = 256  # small chunks kept are joined past this many


class _State(enum.Enum):
    SCAN = "looking for usage"
    PENDING = "reading a candidate event"
    SKIP = "skipping an oversized event"
    ENDED = "the stream ended"


# The states as module names: an enum member looked up on its class costs more, per chunk.
_SCAN, _PENDING, _SKIP, _ENDED = _State


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

    __slots__ = ("shape", "fault", "_figures", "_skipped", "_limit", "_state", "_kept", "_kept_len", "_dropped",
                 "_scanned", "_carry", "_pending", "_pending_start", "_skip_last", "_most_kept")

    def __init__(self, shape: Shape, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.shape = shape
        self.fault: Exception | None = None  # what broke reading, if anything did (it then counts nothing)
        self._figures = Figures(shape)
        self._skipped = 0  # candidate events larger than max_event_bytes, not read
        self._limit = max(16, max_event_bytes)
        self._most_kept = 2 * self._limit  # kept bytes are trimmed past this
        self._state = _SCAN
        self._kept: list[bytes] = []  # the stream's last ≥ limit bytes, its chunks as they came
        self._kept_len = 0  # their length
        self._dropped = 0  # the stream's bytes before them
        self._scanned = 0  # how many of the kept chunks (the first ones) were scanned
        self._carry = b""  # the scanned bytes' last 6 (SCAN), for a "usage" split across chunks
        self._pending: bytes | bytearray = b""  # the candidate event read so far (PENDING)
        self._pending_start = 0  # its offset in the stream
        self._skip_last = b""  # the last byte scanned (SKIP)

    # -- reading -----------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """The next chunk of the stream, b"" when it ended; returns the chunk, unchanged
        (so that the scanner can be a stream callable itself). A chunk is kept (a
        reference, as the stream's last bytes are) and scanned with those after it, in
        one pass, when the kept bytes are trimmed, at the end, or when the usage is asked
        for: one search in C for many small chunks."""
        if chunk:
            kept = self._kept
            kept.append(chunk)
            self._kept_len += len(chunk)
            if self._kept_len > self._most_kept or len(kept) > _MAX_KEPT_PIECES:
                self._settle(ended=False)
        else:
            self._settle(ended=True)
        return chunk

    def result(self) -> Usage | None:
        """The usage read so far (an event still open counts when its JSON is whole);
        None when no usage was read."""
        self._settle()
        if self._state is _PENDING:  # read it into a copy: the stream may go on
            figures = self._figures.copy()
            figures.read(bytes(self._pending), self._pending_start == 0)
            return figures.result()
        return self._figures.result()

    @property
    def complete(self) -> bool:
        """Whether the figures read are the answer's final ones: OpenAI's usage; in the
        Anthropic shape a message_delta's, and the input figures (message_start's)."""
        self._settle()
        return self._figures.complete

    @property
    def events_read(self) -> int:
        """Candidate events parsed."""
        self._settle()
        return self._figures.events_read

    @property
    def events_skipped(self) -> int:
        """Candidate events larger than max_event_bytes, not read."""
        self._settle()
        return self._skipped

    @property
    def held_bytes(self) -> int:
        """The stream's bytes this scanner holds on to (kept chunks, a candidate event)."""
        return self._kept_len + len(self._pending) + len(self._carry)

    def _dispatch(self, event: bytes, at_stream_start: bool) -> None:
        """Parse one candidate event (its lines) and take its figures."""
        self._figures.read(event, at_stream_start)

    def _settle(self, ended: bool | None = None) -> None:
        """Scan the chunks not scanned yet; then trim what is kept (False) or end (True).
        Reading is meant never to raise whatever the stream holds; should it (a fault
        here), the stream still goes on untouched and its answer counts nothing."""
        if self._state is _ENDED:  # what comes after the end is dropped, unread
            return self._end()
        try:
            self._catch_up()
            if ended is not None:
                self._end() if ended else self._trim()
        except Exception as e:  # noqa: BLE001 - a stream must never stop for its reading
            self.fault = e
            self._figures = Figures(self.shape)
            self._state = _SCAN  # so that _end forgets it all
            self._pending = b""
            self._end()

    def _catch_up(self) -> None:
        """Scan the kept chunks not scanned yet, joined: one search for "usage" in them all."""
        kept = self._kept
        n = len(kept) - self._scanned
        if not n:
            return
        self._scanned = len(kept)
        data = kept[-1] if n == 1 else b"".join(kept[-n:])
        start = self._dropped + self._kept_len - len(data)  # data's offset in the stream
        state = self._state
        if state is _SCAN:
            buf = self._carry + data  # "usage" may be split across chunks
            i = buf.find(NEEDLE)
            if i < 0:
                self._carry = buf[-6:]  # the bulk: nothing here
            else:
                self._candidate(buf, start - len(self._carry), i)
        elif state is not _ENDED:
            self._feed(data, start, 0)

    def _candidate(self, buf: bytes, start: int, i: int) -> None:
        """Scanned bytes `buf` (at stream offset `start`: the last bytes scanned before,
        then new ones) with a "usage" at `i`."""
        while i >= 0 and not (buf.startswith(_OBJECT_VALUE, i + len(NEEDLE))  # the usual forms, at once
                              or _could_hold_object(buf, i + len(NEEDLE))):  # e.g. "usage":null
            i = buf.find(NEEDLE, i + len(NEEDLE))
        if i >= 0 and not self._read_within(buf, start, i):  # an event not whole in buf
            self._feed(buf, start, i)
            return
        self._carry = buf[-6:]

    def _read_within(self, buf: bytes, start: int, i: int) -> bool:
        """The fast path for a candidate "usage" at `i` of `buf` (at stream offset
        `start`): when its event, and every later candidate's, begins and ends within
        `buf` (or begins the stream), read them and say True; else read nothing and say
        False (the general path reads them)."""
        at_start = start == 0  # buf is the stream so far
        limit, n = self._limit, len(buf)
        lf_only = b"\r" not in buf  # as most servers write: blank lines are LF LF
        events: list[tuple[int, int, bool]] = []
        while i >= 0:
            if lf_only:
                s = buf.rfind(b"\n\n", max(0, i - limit - 2), i) + 2
                end = buf.find(b"\n\n", i, i + limit + 2)
                if end < 0:
                    return False  # it ends in a later chunk
                resume = end + 2
            else:
                lo = max(0, i - limit - 2)
                s = max(buf.rfind(b"\n\n", lo, i), buf.rfind(b"\r\r", lo, i), buf.rfind(b"\n\r", lo, i)) + 2
                m = _BLANK.search(buf, i)
                if m is None:
                    return False  # it ends in a later chunk
                end, resume = m.start(), m.end()
            if s < 2 and not at_start:
                return False  # the event began before buf
            begin = s if s >= 2 else 0
            if end - begin > limit:
                return False
            events.append((begin, end, begin == 0 and at_start))
            i = buf.find(NEEDLE, resume)
            while i >= 0 and not (buf.startswith(_OBJECT_VALUE, i + len(NEEDLE))
                                  or _could_hold_object(buf, i + len(NEEDLE))):
                i = buf.find(NEEDLE, i + len(NEEDLE))
            if i >= 0 and i + len(NEEDLE) >= n:
                return False  # a "usage" whose value the next chunk tells
        figures = self._figures
        for begin, end, first in events:
            figures.read_span(buf, begin, end, first, lf_only)
        return True

    # -- the states --------------------------------------------------------------------

    def _feed(self, buf: bytes, start: int, pos: int) -> None:
        """Bytes read in another state than SCAN (pos 0), or with a candidate "usage" at
        `pos` of `buf` (at stream offset `start`)."""
        n = len(buf)
        while pos < n:
            if self._state is _SCAN:
                pos = self._scan(buf, start, pos)
            elif self._state is _PENDING:
                pos = self._extend(buf, pos)
            else:
                pos = self._skip(buf, pos)
        self._carry = buf[-6:] if self._state is _SCAN else b""

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
                self._skipped += 1
                self._state, self._skip_last = _SKIP, b""
                return at - start
            s = lo + max(cut, 0)
        self._pending = bytearray(self._bytes(s, at, buf, start))
        self._pending_start = s
        self._state = _PENDING
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
        self._skipped += 1
        self._skip_last = bytes(pending[-1:])
        self._pending = b""
        self._state = _SKIP
        return pos + room

    def _read(self, resume: int) -> int:
        """The candidate event is whole: read it, look on from `resume`."""
        event, self._pending = bytes(self._pending), b""
        self._state = _SCAN
        self._figures.read(event, self._pending_start == 0)
        return resume

    def _skip(self, buf: bytes, pos: int) -> int:
        """Pass over an oversized event to its end."""
        if pos == 0 and self._skip_last and _BLANK.match(self._skip_last + buf[:1]):
            self._state = _SCAN
            return 1
        m = _BLANK.search(buf, pos)
        if m is not None:
            self._state = _SCAN
            return max(pos, m.end())
        self._skip_last = buf[-1:]
        return len(buf)

    def _end(self) -> None:
        if self._state is _PENDING:
            self._figures.read(bytes(self._pending), self._pending_start == 0)
        self._state = _ENDED
        self._pending = b""
        self._kept.clear()
        self._kept_len = 0
        self._most_kept = -1  # a chunk fed after the end settles at once: dropped (_settle)
        self._scanned = 0
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
        self._scanned = len(kept)  # it runs once all is scanned

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


def from_event_stream(body: bytes, shape: Shape, max_event_bytes: int = MAX_EVENT_BYTES) -> Usage | None:
    """The usage of a whole SSE answer held in memory (e.g. one that was buffered)."""
    scanner = UsageScanner(shape, max_event_bytes)
    scanner.feed(body)
    scanner.feed(b"")
    return scanner.result()
