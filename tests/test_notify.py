"""Notifications (rotator/notify): the words of each message (no full key, outside text
cleaned), which events are news (each rule at explicit times), the Notifier's delivery
with a fake sender (queue bound, drops said once, an outage said once and its end once,
the deadline, the drain at exit), and, in the slow tier, real apprise posting to a local
HTTP receiver."""

from __future__ import annotations

import ast
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from rotator.notify import (
    Digest,
    DigestRow,
    KeyDisabled,
    KeyEnabled,
    KeyRef,
    Message,
    Notifier,
    PoolCannotServe,
    PoolServes,
    Said,
    StoreBack,
    StoreUnreachable,
    WindowSpent,
    decide,
    mask_url,
    notify_test,
    notify_urls,
    parse_urls,
    render,
)
from rotator.notify import delivery
from rotator.notify.channels import AppriseSender, reason_from, redact
from rotator.notify.decide import POOL_REPEAT_MS, RESET_SLACK_MS, UNKNOWN_RESET_FORGET_MS
from rotator.notify.render import BODY_MOST, DIGEST_MOST_ROWS, REASON_MOST, TITLE_MOST
from testbed.receiver import Receiver

FULL_KEY = "sk-kimi-" + "Q" * 20 + "wxyz" * 4
OTHER_KEY = "sk-proj-" + "abc123XYZ_-" * 3
KEY_SHAPED = re.compile(r"sk-[A-Za-z0-9_-]{8,}")
WORK = KeyRef(1, "Work", "sk-kim…abcd")
HOME = KeyRef(2, "Home", "sk-kim…wxyz")
MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
# Tuesday 10 June 2025, 11:05 UTC.
T0 = int(datetime(2025, 6, 10, 11, 5, tzinfo=timezone.utc).timestamp() * 1000)


def words(message: Message | None) -> str:
    assert message is not None
    return f"{message.title}\n{message.body}"


# -- rendering ---------------------------------------------------------------------------

def test_a_disabled_key_is_named_with_the_command_that_puts_it_back() -> None:
    message = render(KeyDisabled(WORK, "401 Invalid Authentication"), T0, timezone.utc)
    assert message is not None
    assert message.title == "Kimi key disabled: [1] Work"
    assert "[1] Work (sk-kim…abcd) was disabled: 401 Invalid Authentication." in message.body
    assert "kimi-rotator enable-key 1" in message.body


def test_a_ban_names_no_command() -> None:
    message = render(KeyDisabled(WORK, "banned (Community Guidelines)", can_enable=False), T0)
    assert "enable-key" not in words(message)
    assert "cannot be undone" in words(message)


def test_a_spent_window_says_when_it_resets_in_clock_time_and_from_now() -> None:
    resets = T0 + 2 * DAY + 3 * HOUR  # Thursday 14:05 UTC
    message = render(WindowSpent(WORK, "weekly", resets), T0, timezone.utc)
    assert message is not None
    assert message.title == "Kimi key [1] Work: weekly quota spent"
    assert "[1] Work (sk-kim…abcd) has no weekly quota left." in message.body
    assert "It resets Thu 14:05 (in 2d 3h)" in message.body


def test_clock_times_are_in_the_machines_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "JST-9")  # nine hours ahead of UTC, no tz database needed
    time.tzset()
    try:
        message = render(WindowSpent(WORK, "5-hour", T0 + 3 * HOUR), T0)  # 14:05 UTC
    finally:
        monkeypatch.undo()
        time.tzset()
    assert "It resets Tue 23:05 (in 3h 00m)" in words(message)


def test_a_reset_a_week_away_carries_its_date() -> None:
    message = render(WindowSpent(WORK, "weekly", T0 + 7 * DAY), T0, timezone.utc)
    assert "Tue 17 Jun 11:05 (in 7d 0h)" in words(message)


def test_a_window_without_a_reset_says_so() -> None:
    assert "Kimi did not say when it resets" in words(render(WindowSpent(WORK, "billing", None), T0))


def test_the_pool_that_cannot_serve_says_when_the_next_key_frees() -> None:
    message = render(PoolCannotServe(T0 + 12 * MINUTE + 30_000, cooling=3, disabled=1), T0, timezone.utc)
    assert message is not None
    assert message.title == "Kimi pool cannot serve"
    assert "(3 cooling down, 1 disabled)" in message.body
    assert "The next key frees Tue 11:17 (in 12m 30s)." in message.body
    reminder = render(PoolCannotServe(T0 + HOUR, cooling=3, down_since_ms=T0 - 10 * MINUTE), T0, timezone.utc)
    assert "No key has taken a request for 10m 0s" in words(reminder)
    no_key = render(PoolCannotServe(None, disabled=4), T0)
    assert "No key frees by itself" in words(no_key)


def test_the_pool_serving_again_and_the_store_say_how_long_it_lasted() -> None:
    assert "after 25m 0s without one" in words(render(PoolServes(T0 - 25 * MINUTE), T0))
    gone = render(StoreUnreachable("rediss://redis.example:6380/0", "Connection refused"), T0)
    assert words(gone) == (
        "Kimi team store unreachable\n"
        "The team store rediss://redis.example:6380/0 cannot be reached: Connection refused."
    )
    back = render(StoreBack("rediss://redis.example:6380/0", T0 - 3 * MINUTE), T0)
    assert "answers again, after 3m 0s" in words(back)


def test_the_digest_has_a_line_per_key() -> None:
    rows = (
        DigestRow(WORK, requests=1234, tokens_in=2_100_000, tokens_out=340_000, cache_share=0.62, quota_left=40.4),
        DigestRow(HOME, requests=1, tokens_in=950, tokens_out=12),
    )
    message = render(Digest("2025-06-09", rows), T0)
    assert message is not None
    assert message.title == "Kimi keys on 2025-06-09: 1235 requests"
    assert message.body.split("\n") == [
        "[1] Work (sk-kim…abcd): 1234 requests, tokens 2.1M in / 340.0k out, cache 62%, quota left 40%",
        "[2] Home (sk-kim…wxyz): 1 request, tokens 950 in / 12 out",
    ]
    many = tuple(DigestRow(KeyRef(i, f"k{i}", "sk-kim…abcd"), 1, 1, 1) for i in range(DIGEST_MOST_ROWS + 5))
    assert words(render(Digest("2025-06-09", many), T0)).endswith("… and 5 more keys.")


def test_a_key_enabled_again_says_nothing() -> None:
    assert render(KeyEnabled(WORK), T0) is None


def test_no_full_key_leaves_whatever_the_caller_hands_in() -> None:
    leaky = KeyRef(3, f"named {FULL_KEY}", FULL_KEY)  # a caller that forgot to mask
    events = [
        KeyDisabled(leaky, f"401 for {FULL_KEY} and {OTHER_KEY}"),
        WindowSpent(leaky, f"weekly{FULL_KEY}", T0 + HOUR),
        StoreUnreachable(f"redis://{FULL_KEY}@host", f"AUTH {OTHER_KEY} refused"),
        StoreBack(FULL_KEY, T0 - MINUTE),
        Digest(FULL_KEY, (DigestRow(leaky, 1, 2, 3),)),
    ]
    for event in events:
        text = words(render(event, T0))
        assert FULL_KEY not in text and OTHER_KEY not in text
        assert KEY_SHAPED.search(text) is None, text


def test_a_password_in_a_url_is_not_shown() -> None:
    gone = render(StoreUnreachable("redis://kimi:hunter2@redis.example:6379/0",
                                   "AUTH failed for rediss://:s3cret@r.example/1"), T0)
    text = words(gone)
    assert "hunter2" not in text and "s3cret" not in text
    assert "redis://kimi:…@redis.example:6379/0" in text and "rediss://:…@r.example/1" in text


def test_outside_text_is_cleaned_and_bounded() -> None:
    hostile = (
        "bad\x1b[31m red\x1b[0m \x1b]52;c;ZXZpbA==\x07clip \u202eevil\u202c\x00nul\r\n"
        "Fake line: all keys fine \x9b2J"
    )
    message = render(KeyDisabled(KeyRef(1, "Wo\x1b[2Jrk\nname", "sk-kim…abcd"), hostile), T0)
    text = words(message)
    assert re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", text) is None
    assert "[31m" not in text and "52;c" not in text
    assert message is not None
    assert message.title == "Kimi key disabled: [1] Work name"
    # The reason is one line: no line of the body starts with the text it smuggled in.
    assert not any(line.startswith("Fake line") for line in message.body.split("\n"))
    long = render(KeyDisabled(KeyRef(1, "N" * 500, "sk-kim…abcd"), "R" * 5000), T0)
    assert long is not None
    assert len(long.title) <= TITLE_MOST and len(long.body) <= BODY_MOST
    assert "R" * REASON_MOST not in long.body and "R" * (REASON_MOST - 1) in long.body


# -- deciding ----------------------------------------------------------------------------

def run(events: list[tuple[int, object]], said: Said | None = None) -> list[object]:
    """The events `decide` lets through, fed at their times."""
    said = said or Said()
    out = []
    for now, event in events:
        said, news = decide(said, event, now)  # type: ignore[arg-type]
        if news is not None:
            out.append(news)
    return out


def test_a_key_disabled_twice_is_one_message_until_it_is_enabled() -> None:
    disabled = KeyDisabled(WORK, "401")
    assert run([(T0, disabled), (T0 + HOUR, disabled), (T0 + DAY, KeyDisabled(WORK, "ban", False))]) == [disabled]
    again = run([(T0, disabled), (T0 + 1, KeyEnabled(WORK)), (T0 + 2, disabled)])
    assert again == [disabled, disabled]
    both = run([(T0, disabled), (T0, KeyDisabled(HOME, "401"))])
    assert len(both) == 2


def test_a_window_is_said_once_per_key_window_and_reset() -> None:
    resets = T0 + 2 * DAY
    weekly = WindowSpent(WORK, "weekly", resets)
    drifted = WindowSpent(WORK, "weekly", resets + RESET_SLACK_MS)  # read from headers again
    five_hour = WindowSpent(WORK, "5-hour", T0 + HOUR)
    other_key = WindowSpent(HOME, "weekly", resets)
    next_week = WindowSpent(WORK, "weekly", resets + 7 * DAY)
    said = run([
        (T0, weekly), (T0 + MINUTE, weekly), (T0 + 2 * MINUTE, drifted),
        (T0 + 3 * MINUTE, five_hour), (T0 + 4 * MINUTE, other_key),
        (resets + MINUTE, next_week), (resets + 2 * MINUTE, next_week),
    ])
    assert said == [weekly, five_hour, other_key, next_week]


def test_a_window_without_a_reset_is_said_again_after_a_day() -> None:
    billing = WindowSpent(WORK, "billing", None)
    unsaid = WindowSpent(WORK, "billing", 0)  # how a /usages reading says "not said"
    said = run([(T0, billing), (T0 + HOUR, unsaid), (T0 + UNKNOWN_RESET_FORGET_MS, billing)])
    assert said == [billing, billing]


def test_the_pool_down_is_said_at_most_every_ten_minutes_and_its_end_once() -> None:
    down = PoolCannotServe(T0 + HOUR, cooling=2)
    said = run([
        (T0, down), (T0 + MINUTE, down), (T0 + POOL_REPEAT_MS - 1, down),
        (T0 + POOL_REPEAT_MS, down), (T0 + POOL_REPEAT_MS + 1, down),
        (T0 + 12 * MINUTE, PoolServes()), (T0 + 13 * MINUTE, PoolServes()),
        (T0 + 14 * MINUTE, down),
    ])
    assert said == [
        PoolCannotServe(T0 + HOUR, cooling=2, down_since_ms=T0),
        PoolCannotServe(T0 + HOUR, cooling=2, down_since_ms=T0),
        PoolServes(down_since_ms=T0),
        PoolCannotServe(T0 + HOUR, cooling=2, down_since_ms=T0 + 14 * MINUTE),
    ]
    assert run([(T0, PoolServes())]) == []  # serving all along: nothing to say


def test_a_clock_stepped_back_does_not_repeat_the_pool_down_sooner() -> None:
    down = PoolCannotServe(None)
    back = T0 - HOUR
    said = run([(T0, down), (back, down), (back + POOL_REPEAT_MS - 1, down), (back + POOL_REPEAT_MS, down)])
    assert len(said) == 2


def test_the_store_is_said_once_per_outage_and_once_back() -> None:
    gone = StoreUnreachable("redis://r", "refused")
    said = run([
        (T0, gone), (T0 + MINUTE, gone), (T0 + 2 * MINUTE, StoreBack("redis://r")),
        (T0 + 3 * MINUTE, StoreBack("redis://r")), (T0 + 4 * MINUTE, gone),
    ])
    assert said == [gone, StoreBack("redis://r", down_since_ms=T0), gone]


def test_the_digest_is_said_once_a_day() -> None:
    day = Digest("2025-06-09", ())
    assert run([(T0, day), (T0 + HOUR, day), (T0 + DAY, Digest("2025-06-10", ()))]) == [
        day, Digest("2025-06-10", ())]


# -- URLs --------------------------------------------------------------------------------

def test_urls_from_the_option_else_the_environment() -> None:
    assert parse_urls(["json://a/b, ntfy://topic", "mailto://u:p@x.org?to=a@x.org,b@x.org", "json://a/b", " "]) == [
        "json://a/b", "ntfy://topic", "mailto://u:p@x.org?to=a@x.org,b@x.org"]
    env = {"KIMI_ROTATOR_NOTIFY": "json://e1/, json://e2/"}
    assert notify_urls([], env) == ["json://e1/", "json://e2/"]
    assert notify_urls(["json://o/"], env) == ["json://o/"]
    assert notify_urls([], {}) == []


@pytest.mark.parametrize(("url", "shown"), [
    ("json://user:hunter2@127.0.0.1:8080/path/tok?x=1", "json://127.0.0.1:8080"),
    ("mailto://me:app-password@gmail.com", "mailto://gmail.com"),
    ("ntfys://ntfy.sh/my-secret-topic", "ntfys://ntfy.sh"),
    ("tgram://123456789:AAbbccddeeff/12345", "tgram://…"),
    ("discord://1234567890/webhooktoken", "discord://…"),
    ("ntfy://my-secret-topic", "ntfy://…"),
    ("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnl", "slack://…"),
    ("json://[::1]:9000/x", "json://[::1]:9000"),
    ("dbus://", "dbus://"),
    ("not a url", "(not a URL)"),
])
def test_a_url_is_shown_without_its_secrets(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_a_reason_loses_every_part_of_its_url() -> None:
    url = "tgram://123456789:AAbbccddeeff/12345?token=s3cretvalue"
    said = "HTTPSConnectionPool: /bot123456789:AAbbccddeeff/sendMessage chat 12345 s3cretvalue"
    assert re.search(r"123456789|AAbbcc|12345|s3cret", redact(said, url)) is None
    entries = [
        (logging.WARNING, "A Connection error occurred sending JSON notification to 127.0.0.1."),
        (logging.DEBUG, "Socket Exception: ... url: /path/t0ken (Caused by ... [Errno 111] Connection refused\"))"),
    ]
    assert reason_from(entries, "json://u:pw@127.0.0.1:9/path/t0ken") == (
        "A Connection error occurred sending JSON notification to 127.0.0.1. ([Errno 111] Connection refused)")


# -- the Notifier, with a fake sender -----------------------------------------------------

class FakeSender:
    """Records each send; `fail[url]` makes a URL fail with that reason; `hold[url]`
    (an Event) keeps its sends waiting until set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.calls: list[str] = []  # each URL a send began for, finished or not
        self.fail: dict[str, str] = {}
        self.hold: dict[str, threading.Event] = {}
        self.started = threading.Semaphore(0)
        self._done = threading.Condition()

    def send(self, url: str, title: str, body: str, timeout_s: float) -> str | None:
        self.calls.append(url)
        self.started.release()
        if url in self.hold:
            self.hold[url].wait(30)
        with self._done:
            self.sent.append((url, title, body))
            self._done.notify_all()
        return self.fail.get(url)

    def wait_sent(self, count: int, timeout: float = 10) -> None:
        with self._done:
            assert self._done.wait_for(lambda: len(self.sent) >= count, timeout), self.sent


def message(n: int) -> Message:
    return Message("test", f"title {n}", f"body {n}")


def notify_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rotator.notify"]


@pytest.fixture
def notifiers() -> Iterator[list[Notifier]]:
    made: list[Notifier] = []
    yield made
    for notifier in made:
        notifier.close(1)


def test_without_urls_nothing_is_sent_nor_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sender = FakeSender()
    notifier = Notifier([], sender=sender)
    assert notifier.observe(KeyDisabled(WORK, "401"), T0) is False
    assert notifier.post(message(1)) is False
    assert notifier.close(1) == 0
    assert sender.sent == [] and notify_lines(caplog) == [] and not notifier.active


def test_an_event_is_sent_once_to_every_url(notifiers: list[Notifier]) -> None:
    sender = FakeSender()
    notifier = Notifier(["json://a.example/", "json://b.example/"], sender=sender)
    notifiers.append(notifier)
    assert notifier.observe(KeyDisabled(WORK, f"401 {FULL_KEY}"), T0)
    assert not notifier.observe(KeyDisabled(WORK, "401"), T0 + 1)
    sender.wait_sent(2)
    assert notifier.close(5) == 0
    assert sorted(url for url, _, _ in sender.sent) == ["json://a.example/", "json://b.example/"]
    assert all(FULL_KEY not in body and "enable-key 1" in body for _, _, body in sender.sent)
    recent = notifier.recent()
    assert [(s.kind, s.delivered, s.failed) for s in recent] == [("key-disabled", 2, 0)]
    assert notifier.channels() == ["json://a.example", "json://b.example"]


def test_a_full_queue_drops_and_says_so_once(caplog: pytest.LogCaptureFixture, notifiers: list[Notifier]) -> None:
    caplog.set_level(logging.INFO)
    sender = FakeSender()
    url = "json://hook.example/"
    sender.hold[url] = threading.Event()
    notifier = Notifier([url], sender=sender, queue_size=3)
    notifiers.append(notifier)
    assert notifier.post(message(0))
    assert sender.started.acquire(timeout=10)  # the worker holds message 0, the queue is empty
    assert [notifier.post(message(n)) for n in range(1, 9)] == [True] * 3 + [False] * 5
    assert notifier.dropped == 5
    full = [line for line in notify_lines(caplog) if "queue is full" in line]
    assert full == ["notify: the queue is full (3 messages waiting); new messages are dropped until it drains"]
    sender.hold[url].set()
    sender.wait_sent(4)
    assert notifier.post(message(9))
    assert notify_lines(caplog)[-1] == "notify: the queue takes messages again; 5 were dropped"
    sender.wait_sent(5)
    assert [title for _, title, _ in sender.sent] == [f"title {n}" for n in (0, 1, 2, 3, 9)]
    assert len(notify_lines(caplog)) == 2


def test_a_failing_url_is_logged_once_per_outage_without_its_secrets(
    caplog: pytest.LogCaptureFixture, notifiers: list[Notifier]
) -> None:
    caplog.set_level(logging.INFO)
    sender = FakeSender()
    bad = "json://user:hunter2pass@127.0.0.1:9/t0kenpath"
    good = "json://hook.example/"
    sender.fail[bad] = f"refused by {bad} (hunter2pass)\x1b[31m"
    notifier = Notifier([good, bad], sender=sender)
    notifiers.append(notifier)
    for n in range(5):
        notifier.post(message(n))
    sender.wait_sent(10)
    del sender.fail[bad]
    notifier.post(message(5))
    sender.wait_sent(12)
    notifier.close(5)
    lines = notify_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("notify: cannot send to json://127.0.0.1:9: refused by … (…)")
    assert lines[1] == "notify: json://127.0.0.1:9 works again (5 messages not delivered meanwhile)"
    logged = "\n".join(lines)
    assert "hunter2pass" not in logged and "t0kenpath" not in logged and "\x1b" not in logged
    assert [(s.delivered, s.failed) for s in notifier.recent()] == [(1, 1)] * 5 + [(2, 0)]


def test_a_url_that_never_answers_costs_one_deadline_and_one_thread(
    caplog: pytest.LogCaptureFixture, notifiers: list[Notifier]
) -> None:
    caplog.set_level(logging.INFO)
    sender = FakeSender()
    stuck, good = "json://stuck.example/", "json://hook.example/"
    sender.hold[stuck] = threading.Event()
    notifier = Notifier([stuck, good], sender=sender, deadline_s=0.2)
    notifiers.append(notifier)
    started = time.monotonic()
    notifier.post(message(1))
    notifier.post(message(2))
    assert notifier.close(10) == 0
    assert time.monotonic() - started < 5
    # Message 1 waited the deadline for the stuck URL; message 2 was not handed to it.
    assert [url for url, _, _ in sender.sent] == [good, good]
    assert sender.calls.count(stuck) == 1
    assert [(s.delivered, s.failed) for s in notifier.recent()] == [(1, 1), (1, 1)]
    assert notify_lines(caplog)[0] == (
        "notify: cannot send to json://stuck.example: no answer within 0.2 s "
        "(said once; a line follows when it works again)")
    sender.hold[stuck].set()


def test_close_sends_what_is_queued_and_counts_what_it_could_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = FakeSender()
    notifier = Notifier(["json://hook.example/"], sender=sender)
    for n in range(3):
        notifier.post(message(n))
    assert notifier.close(5) == 0
    assert len(sender.sent) == 3
    assert notifier.post(message(4)) is False  # closed

    held = FakeSender()
    held.hold["json://hook.example/"] = threading.Event()
    notifier = Notifier(["json://hook.example/"], sender=held, deadline_s=30)
    for n in range(3):
        notifier.post(message(n))
    assert held.started.acquire(timeout=10)
    assert notifier.close(0.1) == 3
    assert "notify: 3 messages not sent at exit" in notify_lines(caplog)
    held.hold["json://hook.example/"].set()


def test_without_apprise_one_line_and_nothing_sent(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "apprise_missing", lambda: "apprise is not installed")
    notifier = Notifier(["json://hook.example/"])
    assert not notifier.active and notifier.post(message(1)) is False
    assert notify_lines(caplog) == ["notify: apprise is not installed; nothing will be sent"]
    assert notify_test(["json://hook.example/"]) == (False, ["apprise is not installed"])


def test_notify_test_says_one_line_per_url() -> None:
    sender = FakeSender()
    sender.fail["ntfy://secret-topic"] = "HTTP 403 for ntfy://secret-topic"
    ok, lines = notify_test(["json://hook.example/", "ntfy://secret-topic"], sender=sender)
    assert not ok
    assert lines == ["sent to json://hook.example", "failed: ntfy://…: HTTP 403 for …"]
    assert notify_test(["json://hook.example/"], sender=sender) == (True, ["sent to json://hook.example"])
    assert notify_test([], sender=sender)[0] is False


def test_the_package_imports_of_rotator_only_the_core_and_the_pools_events() -> None:
    # The layers contract (tests/test_layers.py) allows more; this package needs only
    # these, and its core (events, render, decide, delivery, channels) none of them.
    package = Path(__file__).parent.parent / "rotator" / "notify"
    allowed = ("rotator.notify", "rotator.core", "rotator.pool.events")
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith("rotator") or name.startswith(allowed), (path, name)
                if name == "apprise":  # only inside the functions that send
                    assert isinstance(node, ast.Import) and node.col_offset > 0, path


# -- real apprise, a real receiver (testbed.receiver; the fixture `receiver` in conftest) --

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_apprise_posts_each_message_to_a_local_receiver(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"json://127.0.0.1:{receiver.port}/hook"
    notifier = Notifier([url], sender=AppriseSender())
    notifier.observe(KeyDisabled(WORK, f"401 Invalid Authentication for {FULL_KEY}"), T0)
    notifier.observe(KeyDisabled(WORK, "401 again"), T0 + 1)
    notifier.observe(PoolCannotServe(T0 + 5 * MINUTE, cooling=1, disabled=1), T0 + 2)
    assert notifier.close(30) == 0
    bodies = receiver.wait(2)
    assert [(b["title"], b["type"]) for b in bodies] == [
        ("Kimi key disabled: [1] Work", "info"), ("Kimi pool cannot serve", "info")]
    assert "kimi-rotator enable-key 1" in str(bodies[0]["message"])
    assert FULL_KEY not in json.dumps(bodies) and KEY_SHAPED.search(json.dumps(bodies)) is None
    assert len(receiver.bodies) == 2
    # Lines of apprise and of the HTTP library under it (which name URL paths) stay out of the log.
    assert [r.name for r in caplog.records] == []


@pytest.mark.slow
def test_notify_test_against_a_live_and_a_closed_port(receiver: Receiver) -> None:
    live = f"json://127.0.0.1:{receiver.port}/"
    closed = f"json://user:hunter2pass@127.0.0.1:{closed_port()}/t0ken"
    ok, lines = notify_test([live, closed, "nosuch://whatever"])
    assert not ok
    assert lines[0] == f"sent to json://127.0.0.1:{receiver.port}"
    assert lines[1].startswith(f"failed: json://127.0.0.1:{closed.rsplit(':', 1)[1].split('/')[0]}: ")
    assert "Connection refused" in lines[1]
    assert lines[2] == "failed: nosuch://…: apprise cannot use this URL (an unknown service, or a part of it missing)"
    assert "hunter2pass" not in "\n".join(lines) and "t0ken" not in "\n".join(lines)
    assert receiver.wait(1)[0]["title"] == "kimi-rotator: test notification"
    assert notify_test([live]) == (True, [f"sent to json://127.0.0.1:{receiver.port}"])


@pytest.mark.slow
def test_a_receiver_that_never_answers_is_cut_at_the_deadline() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"json://127.0.0.1:{silent.getsockname()[1]}/"
        started = time.monotonic()
        ok, lines = notify_test([url], deadline_s=1.0)
        took = time.monotonic() - started
    assert not ok and took < 3, (took, lines)
    assert lines == [f"failed: {mask_url(url)}: no answer within 1 s"]
