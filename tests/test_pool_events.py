"""The pool's events, told to the one listener it is given (rotator.pool.events), and the
parts that rotator.proxy.assembly wires to them."""

from __future__ import annotations

import asyncio

from rotator.core import policy
from rotator.core.models import Account, AccountsFile
from rotator.pool.events import PoolListeners
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.proxy.assembly import Shell, assemble
from rotator.proxy.flows import FlowLedger
from rotator.proxy.options import Settings
from rotator.status.tally import Tally
from testbed.hooks import FakeClock
from testbed.pool_events import RecordedPoolEvents
from tests.support.accounts import NOW, fake_key

OK = policy.classify(200, {}, b"{}", NOW)
BANNED = policy.classify(403, {}, b'{"error":{"message":"access terminated: community guidelines"}}', NOW)
WEEKLY = policy.classify(429, {}, b'{"error":{"message":"You have reached your weekly usage limit"}}', NOW)
REVOKED = policy.classify(401, {}, b'{"error":{"message":"Invalid Authentication"}}', NOW)


def _pool(listener: object, count: int = 2) -> KeyPool:
    accounts = [Account(key=fake_key(i), name=f"k{i}") for i in range(count)]
    return KeyPool(AccountsFile(accounts=accounts), clock=FakeClock(NOW), listener=listener)  # type: ignore[arg-type]


def test_an_answer_tells_its_slot_freed_then_a_key_freed_and_a_change_only_when_the_key_changed():
    heard = RecordedPoolEvents()
    pool = _pool(heard)
    lease = pool.acquire(NOW)
    assert isinstance(lease, Lease)
    assert heard.events == []  # taking a key tells nothing
    pool.release(lease, OK, NOW)
    assert heard.events == [("slot_freed", lease.key), ("key_freed",)]
    heard.events.clear()
    revoked = pool.acquire(NOW)
    assert isinstance(revoked, Lease)
    assert pool.release(revoked, REVOKED, NOW) is not None  # the key is disabled
    assert heard.events == [
        ("slot_freed", revoked.key), ("key_disabled", revoked.index, revoked.key, True), ("key_freed",),
        ("state_changed",),
    ]
    heard.events.clear()
    other = pool.acquire(NOW)  # the other key: the first is disabled
    assert isinstance(other, Lease) and other.key != revoked.key
    pool.release(other, REVOKED, NOW)
    assert heard.named("key_disabled") == [(other.index, other.key, True)]


def test_a_ban_is_a_key_disabled_that_a_person_cannot_enable_and_a_window_refusal_says_until_when():
    heard = RecordedPoolEvents()
    pool = _pool(heard)
    banned = pool.acquire(NOW)
    assert isinstance(banned, Lease)
    pool.release(banned, BANNED, NOW)
    assert heard.named("key_disabled") == [(banned.index, banned.key, False)]
    spent = pool.acquire(NOW)
    assert isinstance(spent, Lease)
    pool.release(spent, WEEKLY, NOW)
    (event,) = heard.named("window_spent")
    assert event[:3] == (spent.index, spent.key, "weekly") and event[3] > NOW
    assert heard.named("key_disabled") == [(banned.index, banned.key, False)]  # said once


def test_a_key_enabled_again_in_an_adopted_state_is_told():
    heard = RecordedPoolEvents()
    pool = _pool(heard)
    pool.release(pool.acquire(NOW), REVOKED, NOW)  # type: ignore[arg-type]
    pool.take_changes()  # saved
    state = pool.state.model_copy(deep=True)
    pool.adopt(state)
    assert heard.named("key_enabled") == []  # still disabled
    state = pool.state.model_copy(deep=True)
    state.accounts[0].disabled_reason = None  # as enable-key writes it
    pool.adopt(state)
    assert heard.named("key_enabled") == [(0, fake_key(0))]


def test_a_request_never_sent_frees_its_slot_and_changes_nothing():
    heard = RecordedPoolEvents()
    pool = _pool(heard)
    lease = pool.acquire(NOW)
    assert isinstance(lease, Lease)
    pool.abandon(lease)
    assert heard.events == [("slot_freed", lease.key), ("key_freed",)]


def test_listeners_are_told_in_order_each_event():
    first, second = RecordedPoolEvents(), RecordedPoolEvents()
    pool = _pool(PoolListeners(first, second))
    pool.adopt(pool.state)  # a change from the store: a state taken on, and a key may have freed
    assert first.events == second.events == [("adopted",), ("key_freed",)]


def test_the_assembly_wires_the_wait_line_and_the_addons_listeners_to_its_pool():
    async def run() -> tuple[object, RecordedPoolEvents]:
        clock = FakeClock(NOW)
        heard = RecordedPoolEvents()
        shell = Shell(FlowLedger(), None, clock, None, Tally(), listeners=(heard,))  # type: ignore[arg-type]
        parts = assemble(shell, Settings(), max_in_flight=1)
        assert parts.sync is parts.team is parts.notices is None  # no store: no save loop, no team
        parts.pool.adopt(AccountsFile(accounts=[Account(key=fake_key(0))]))
        held = parts.pool.acquire(clock.now)
        assert isinstance(held, Lease)
        waiter = asyncio.ensure_future(parts.line.acquire(clock.now + 30_000))
        await asyncio.sleep(0)
        assert not waiter.done()  # the key is at its cap of one
        parts.pool.release(held, OK, clock.now)  # the line hears the key free, and serves
        return await asyncio.wait_for(waiter, 1), heard

    got, heard = asyncio.run(run())
    assert isinstance(got, Lease)
    assert ("slot_freed", fake_key(0)) in heard.events  # the addon's listener heard it too
