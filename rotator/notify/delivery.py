"""Delivery off the proxy's path: a bounded queue, one worker thread, a deadline per
message, and one log line per outage rather than one per message.

`Notifier.observe` (or `post`) costs the caller a decision, a few strings and a
non-blocking put, whatever the channels do. The worker sends each message to every URL
at once, one short-lived thread per URL, and waits at most `DEADLINE_S` for them all;
apprise's own socket timeouts (4 s to connect, 4 s per read; with apprise >= 2 also the
call's `timeout=`) end a send sooner. A URL whose send outlives the deadline gets no new
message until that send returns, so a channel that never answers holds one thread,
never a growing heap of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import tzinfo

from rotator.notify.channels import (
    REASON_MOST,
    AppriseSender,
    Sender,
    apprise_missing,
    mask_url,
    redact,
)
from rotator.notify.decide import Said, decide
from rotator.notify.events import Event, Message
from rotator.notify.render import render
from rotator.notify.text import clean

log = logging.getLogger("rotator.notify")

QUEUE_SIZE = 100  # messages waiting; each is a change, so a full queue means a stuck channel
DEADLINE_S = 10.0  # per message, every URL at once: above apprise's 4 s + 4 s for one request
RECENT_SIZE = 20  # messages remembered for the status page
TEST_TITLE = "kimi-rotator: test notification"
TEST_BODY = "This channel will be told when a key or the pool needs a person."


@dataclass(frozen=True)
class Sent:
    """One message handled, for the status page: when, what, and how many URLs took it."""

    at_ms: int
    kind: str
    title: str
    delivered: int
    failed: int


class _Slots:
    """URLs with a send still running past its deadline: they get no new one until it
    returns (at most one stuck thread per URL)."""

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def take(self, url: str) -> bool:
        with self._lock:
            if url in self._busy:
                return False
            self._busy.add(url)
            return True

    def free(self, url: str) -> None:
        with self._lock:
            self._busy.discard(url)


def send_all(
    sender: Sender, urls: Sequence[str], title: str, body: str, deadline_s: float,
    slots: _Slots | None = None,
) -> dict[str, str | None]:
    """Sends to every URL at once and waits at most `deadline_s` in all: for each URL,
    None if it was sent, else why not."""
    slots = slots or _Slots()
    outcome: dict[str, str | None] = {}
    threads: list[tuple[str, threading.Thread]] = []

    def run(url: str) -> None:
        try:
            outcome[url] = sender.send(url, title, body, deadline_s)
        except Exception as error:  # a sender's bug is this URL's failure, nothing more
            outcome[url] = f"the sender failed: {type(error).__name__}"
        finally:
            slots.free(url)

    for url in urls:
        if not slots.take(url):
            outcome[url] = "an earlier message to it has not finished yet"
            continue
        thread = threading.Thread(target=run, args=(url,), name="kimi-notify-send", daemon=True)
        thread.start()
        threads.append((url, thread))
    ends = time.monotonic() + deadline_s
    for url, thread in threads:
        thread.join(max(0.0, ends - time.monotonic()))
    late = f"no answer within {deadline_s:g} s"
    return {url: _why(outcome.get(url, late), url) for url in urls}


def _why(why: str | None, url: str) -> str | None:
    """A reason as it may be logged: no part of the URL, one clean line (a sender's
    words are cleaned again here, whoever wrote them)."""
    if why is None:
        return None
    return clean(redact(why, url), REASON_MOST) or "failed, no reason given"


def notify_test(
    urls: Sequence[str], sender: Sender | None = None, deadline_s: float = DEADLINE_S
) -> tuple[bool, list[str]]:
    """One test message to each URL, now, within `deadline_s`: (every one sent, one line
    per URL saying sent or why not). For `kimi-rotator notify-test [URL]`."""
    if not urls:
        return False, ["no notification URL: set kimi_notify or KIMI_ROTATOR_NOTIFY, or give one"]
    if sender is None:
        missing = apprise_missing()
        if missing:
            return False, [missing]
        sender = AppriseSender()
    outcome = send_all(sender, urls, TEST_TITLE, TEST_BODY, deadline_s)
    lines = [
        f"sent to {mask_url(url)}" if why is None else f"failed: {mask_url(url)}: {why}"
        for url, why in outcome.items()
    ]
    return all(why is None for why in outcome.values()), lines


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


_STOP = object()


class Notifier:
    """Tells a person, through apprise URLs, what the pool reports; inert (sends and logs
    nothing) without URLs. Thread-safe: events may come from the event loop and from the
    store's worker thread alike."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        sender: Sender | None = None,
        queue_size: int = QUEUE_SIZE,
        deadline_s: float = DEADLINE_S,
        tz: tzinfo | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.urls = list(urls)
        self.queue_size = queue_size
        self.deadline_s = deadline_s
        self.dropped = 0  # messages the full queue refused, in all
        self._tz = tz
        self._wall_ms = wall_ms
        self._said = Said()
        self._queue: deque[Message | object] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._dropping = 0  # dropped since the queue was last able to take a message
        self._closed = False
        self._down: dict[str, int] = {}  # failing URL -> messages it missed
        self._slots = _Slots()
        self._recent: deque[Sent] = deque(maxlen=RECENT_SIZE)
        self._sender: Sender | None = sender
        self._worker: threading.Thread | None = None
        if self.urls:
            if self._sender is None:
                missing = apprise_missing()
                if missing:
                    log.warning("notify: %s; nothing will be sent", missing)
                    self.urls = []
                    return
                self._sender = AppriseSender()
            self._worker = threading.Thread(target=self._work, name="kimi-notify", daemon=True)
            self._worker.start()

    @property
    def active(self) -> bool:
        return bool(self.urls)

    def channels(self) -> list[str]:
        """The configured URLs as a page may show them (no tokens)."""
        return [mask_url(url) for url in self.urls]

    def recent(self) -> list[Sent]:
        """The last messages handled, oldest first."""
        with self._lock:
            return list(self._recent)

    def observe(self, event: Event, now_ms: int) -> bool:
        """Reports `event`; queues a message if it is news (see rotator.notify.decide).
        True if one was queued."""
        if not self.urls:
            return False
        with self._lock:
            self._said, news = decide(self._said, event, now_ms)
        message = render(news, now_ms, self._tz) if news is not None else None
        return message is not None and self.post(message)

    def post(self, message: Message) -> bool:
        """Queues `message` without waiting; False if it was dropped (full or closed)."""
        if not self.urls:
            return False
        with self._lock:
            if self._closed:
                return False
            if len(self._queue) >= self.queue_size:
                self.dropped += 1
                self._dropping += 1
                if self._dropping == 1:
                    log.warning(
                        "notify: the queue is full (%d messages waiting); new messages are "
                        "dropped until it drains", self.queue_size)
                return False
            if self._dropping:
                log.warning("notify: the queue takes messages again; %d were dropped", self._dropping)
                self._dropping = 0
            self._queue.append(message)
            self._ready.notify()
        return True

    def close(self, timeout_s: float) -> int:
        """Stops taking messages and sends what is queued for at most `timeout_s`;
        the number of messages left unsent (said in the log when any)."""
        if self._worker is None or self._closed:
            return 0
        with self._lock:
            self._closed = True
            self._queue.append(_STOP)
            self._ready.notify()
        self._worker.join(timeout_s)
        with self._lock:
            left = sum(1 for item in self._queue if item is not _STOP)
        if self._worker.is_alive():  # still sending: count that message too
            left += 1
        if left:
            log.warning("notify: %d message%s not sent at exit", left, "" if left == 1 else "s")
        return left

    # -- the worker thread -----------------------------------------------------------------

    def _next(self) -> Message | object:
        with self._lock:
            while not self._queue:
                self._ready.wait()
            return self._queue.popleft()

    def _work(self) -> None:
        prepare = getattr(self._sender, "prepare", None)
        if callable(prepare):  # apprise's plugins load now, not when the first news waits
            for url in self.urls:
                why = _why(prepare(url), url)
                if why is not None:
                    self._heard(url, why)
        while True:
            item = self._next()
            if item is _STOP or not isinstance(item, Message):
                return
            try:
                self._deliver(item)
            except Exception:  # never let one message end the worker
                log.exception("notify: could not deliver a message")

    def _deliver(self, message: Message) -> None:
        assert self._sender is not None
        outcome = send_all(self._sender, self.urls, message.title, message.body,
                           self.deadline_s, self._slots)
        for url, why in outcome.items():
            self._heard(url, why)
        failed = sum(1 for why in outcome.values() if why is not None)
        sent = Sent(self._wall_ms(), message.kind, message.title, len(outcome) - failed, failed)
        with self._lock:
            self._recent.append(sent)

    def _heard(self, url: str, why: str | None) -> None:
        """One line when a URL starts failing, one when it works again."""
        missed = self._down.get(url)
        if why is None:
            if missed is not None:
                del self._down[url]
                log.info("notify: %s works again (%d message%s not delivered meanwhile)",
                            mask_url(url), missed, "" if missed == 1 else "s")
            return
        if missed is None:
            log.warning("notify: cannot send to %s: %s (said once; a line follows when it works again)",
                        mask_url(url), why)
        self._down[url] = (missed or 0) + 1
