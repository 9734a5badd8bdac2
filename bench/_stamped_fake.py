"""testbed.fake_kimi, plus a stamp on stdout for every SSE event it writes.

    python -m bench._stamped_fake --port 0 [--event-delay 0.05] [--no-record]

Same command line and behaviour as ``python -m testbed.fake_kimi``; in addition, just
before writing each SSE event of a streamed answer it notes ``time.monotonic_ns()``
and, once the event is written, prints ``stamp REQUEST_NUMBER EVENT_INDEX NS``
(REQUEST_NUMBER is what the answer's ``x-fake-kimi-request`` header says).
CLOCK_MONOTONIC is one clock for every process on the machine, so a client can
subtract a stamp from its own arrival time: the latency of that event from the
server's write to the client's read, whatever sits in between.

It wraps the handler's output stream for the duration of ``FakeKimi._send_sse``;
nothing in tests/ is changed.
"""

from __future__ import annotations

import time

from testbed import fake_kimi

_send_sse = fake_kimi.FakeKimi._send_sse


class _StampingWriter:
    def __init__(self, real, number: int) -> None:
        self._real = real
        self._number = number
        self._events = 0

    def write(self, data: bytes) -> int:
        if b"event: " not in data:
            return self._real.write(data)
        stamp = time.monotonic_ns()
        written = self._real.write(data)
        print(f"stamp {self._number} {self._events} {stamp}", flush=True)
        self._events += 1
        return written

    def __getattr__(self, name: str):
        return getattr(self._real, name)


def _stamped_send_sse(self, h, seen, *args, **kwargs):
    real = h.wfile
    h.wfile = _StampingWriter(real, seen.number)
    try:
        return _send_sse(self, h, seen, *args, **kwargs)
    finally:
        h.wfile = real


fake_kimi.FakeKimi._send_sse = _stamped_send_sse

if __name__ == "__main__":
    raise SystemExit(fake_kimi.main())
