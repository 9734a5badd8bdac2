"""What the proxy tells a person: the pool's events and the proxy's no-key answers, in;
messages out (rotator.notify.pool_listener), with a fake sender and the fake clock."""

from __future__ import annotations

import threading

from rotator.core import policy
from rotator.core.keys import mask_key
from rotator.core.models import Account, AccountsFile
from rotator.core.quota import QuotaReading, QuotaWindow
from rotator.core.strategies import Shortage, Unavailable
from rotator.notify.delivery import Notifier
from rotator.notify.pool_listener import PoolNotifications
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from testbed.hooks import FakeClock
from tests.support.accounts import KEYS, NOW

URL = "json://127.0.0.1:9/"
REVOKED = policy.classify(401, {}, b'{"error":{"message":"Invalid Authentication"}}', NOW)
BANNED = policy.classify(403, {}, b'{"error":{"message":"access terminated: community guidelines"}}', NOW)
RATE_LIMITED = policy.classify(429, {"retry-after": "30"}, b"", NOW)
OK = policy.classify(200, {}, b"{}", NOW)


class Sender:
    """Records each message sent, as (title, body)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def send(self, url: str, title: str, body: str, timeout_s: float) -> str | None:
        with self._lock:
            self.sent.append((title, body))
        return None


def _setup(count: int = 3) -> tuple[KeyPool, PoolNotifications, Sender, FakeClock]:
    clock = FakeClock(NOW)
    sender = Sender()
    notes = PoolNotifications(clock, Notifier([URL], sender=sender))
    accounts = [Account(key=key, name=f"K{i}") for i, key in enumerate(KEYS[:count])]
    pool = KeyPool(AccountsFile(accounts=accounts, rotation_strategy="round-robin"), clock=clock, listener=notes)
    return pool, notes, sender, clock


def _sent(notes: PoolNotifications, sender: Sender) -> list[tuple[str, str]]:
    """What was sent once every queued message went out."""
    assert notes.notifier.close(5) == 0
    return sender.sent


def _answer(pool: KeyPool, outcome: policy.Outcome, now: int) -> Lease:
    lease = pool.acquire(now)
    assert isinstance(lease, Lease)
    pool.release(lease, outcome, now)
    return lease


def test_a_key_answering_401_is_said_once_with_its_masked_key_and_the_command_that_enables_it():
    pool, notes, sender, _ = _setup()
    in_flight = [pool.acquire(NOW, tried=KEYS[1:]) for _ in range(4)]  # four requests on key 0
    for lease in in_flight:  # each answered 401
        assert isinstance(lease, Lease) and lease.key == KEYS[0]
        pool.release(lease, REVOKED, NOW)
    revoked = in_flight[0]
    assert isinstance(revoked, Lease)
    _answer(pool, OK, NOW)
    ((title, body),) = _sent(notes, sender)
    assert "disabled" in title
    assert mask_key(revoked.key) in body
    assert f"kimi-rotator enable-key {revoked.index}" in body
    assert all(key not in title + body for key in KEYS)


def test_a_banned_key_is_said_without_a_command_a_person_cannot_use():
    pool, notes, sender, _ = _setup()
    _answer(pool, BANNED, NOW)
    ((_, body),) = _sent(notes, sender)
    assert "enable-key" not in body and "cannot be undone" in body


def test_a_spent_window_is_said_once_per_reset_from_a_reading_and_from_an_answer():
    pool, notes, sender, _ = _setup()
    resets = NOW + 3 * 3_600_000
    spent = QuotaWindow(minutes=300, limit=100, used=100, reset_time=resets)
    reading = QuotaReading(taken_at=NOW, windows=[spent])
    assert pool.take_reading(KEYS[0], reading, NOW) is not None  # cools the key
    pool.take_reading(KEYS[0], reading, NOW + 1000)  # the same reading again: cooling already
    weekly = policy.classify(429, {}, b'{"error":{"message":"You have reached your weekly usage limit"}}', NOW)
    lease = pool.acquire(NOW)
    assert isinstance(lease, Lease) and lease.key != KEYS[0]
    pool.release(lease, weekly, NOW)
    sent = _sent(notes, sender)
    assert [title for title, _ in sent] == [
        "Kimi key [0] K0: 5-hour quota spent", f"Kimi key [{lease.index}] K{lease.index}: weekly quota spent",
    ]


def test_every_key_cooling_is_said_once_and_serving_again_once_and_traffic_says_nothing():
    pool, notes, sender, clock = _setup(2)
    busy = Unavailable(Shortage.ALL_SKIPPED)
    notes.no_key(busy, pool.accounts)  # busy or already tried: traffic
    for _ in range(2):
        _answer(pool, OK, NOW)
        notes.took_key()
    _answer(pool, RATE_LIMITED, NOW)
    _answer(pool, RATE_LIMITED, NOW + 10_000)  # the second key too: nothing is usable
    why = pool.peek(NOW + 10_000)
    assert isinstance(why, Unavailable) and why.shortage is Shortage.ALL_COOLING
    for step in range(5):  # each request answered "no key" meanwhile
        clock.now = NOW + 10_000 + step * 1_000
        notes.no_key(why, pool.accounts)
    notes.took_key()  # a key took a request again
    notes.took_key()
    titles = [title for title, _ in _sent(notes, sender)]
    assert titles == ["Kimi pool cannot serve", "Kimi pool serves again"]


def test_a_team_store_gone_and_back_is_said_once_each():
    _, notes, sender, _ = _setup()
    for _ in range(3):
        notes.store_problem("redis://kimi:***@team.example:6379/0", "Connection refused")
    notes.store_problem("redis://kimi:***@team.example:6379/0", None)
    titles = [title for title, _ in _sent(notes, sender)]
    assert titles == ["Kimi team store unreachable", "Kimi team store back"]


def test_without_urls_nothing_is_sent_and_no_thread_is_started():
    clock = FakeClock(NOW)
    before = threading.active_count()
    notes = PoolNotifications(clock)
    pool = KeyPool(AccountsFile(accounts=[Account(key=KEYS[0])]), clock=clock, listener=notes)
    _answer(pool, REVOKED, NOW)
    notes.no_key(Unavailable(Shortage.ALL_DISABLED), pool.accounts)
    assert not notes.notifier.active and notes.notifier.recent() == []
    assert threading.active_count() == before


def test_the_status_document_shows_the_channels_masked_and_the_last_messages():
    """Issue 28, item 5: /status.json (and so the page) lists where messages go, without
    the URLs' tokens, and the last messages handled."""
    from types import SimpleNamespace

    from rotator.proxy.status_page import StatusPage
    from rotator.status import document

    clock = FakeClock(NOW)
    sender = Sender()
    notes = PoolNotifications(clock, Notifier(["tgram://123456:SECRETTOKEN/987", URL], sender=sender))
    accounts = [Account(key=key, name=f"K{i}") for i, key in enumerate(KEYS)]
    pool = KeyPool(AccountsFile(accounts=accounts), clock=clock, listener=notes)
    _answer(pool, REVOKED, NOW)
    assert notes.notifier.close(5) == 0
    page = StatusPage(SimpleNamespace(notify=notes))
    reading = page._notify_reading()
    assert reading is not None
    doc = document.status_document(document.snapshot(pool, _tally(), [], NOW, notify=reading))
    assert doc["notify"]["channels"] == ["tgram://…", "json://127.0.0.1:9"]
    assert "SECRETTOKEN" not in repr(doc)
    [sent] = doc["notify"]["recent"]
    assert "disabled" in sent["title"] and sent["delivered"] == 2 and sent["failed"] == 0

    quiet = PoolNotifications(clock, Notifier([], sender=sender))
    assert StatusPage(SimpleNamespace(notify=quiet))._notify_reading() is None  # no section without URLs


def _tally():
    from rotator.status.tally import Tally

    return Tally()
