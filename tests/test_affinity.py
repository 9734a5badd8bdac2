"""Conversation affinity wired into the addon (issue 25), in process: a fake clock and a
fake upstream stand in for time and Kimi. Which key each turn of a conversation goes
to, how new conversations spread, how a refused turn moves its conversation, and what a
person sees (flow comments, /status.json, /metrics, kimi.sessions)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from mitmproxy import exceptions, http

from rotator.core.models import Account, AccountsFile
from rotator.conversations.pins import PinTable
from rotator.pool.affinity import Affinity
from rotator.pool.events import PoolListeners
from rotator.pool.key_pool import KeyPool
from rotator.status import document, metrics
from rotator.store import file as storage
from testbed.hooks import FakeClock, kimi_flow, run_virtual
from tests.support.accounts import KEYS
from tests.support.agents import CLAUDE_UA, KIMI_UA, OPENCODE_UA, kimi_cli_body
from tests.support.in_process import FakeUpstream, addon_in_taddons, kimi_error, success

MESSAGES = "/coding/v1/messages"


def claude_turn(session: str) -> http.HTTPFlow:
    flow = kimi_flow()
    flow.request.headers["user-agent"] = CLAUDE_UA.decode()
    flow.request.headers["x-claude-code-session-id"] = session
    flow.request.content = b'{"model":"kimi-for-coding","messages":[]}'
    return flow


def opencode_turn(session: str) -> http.HTTPFlow:
    flow = kimi_flow()
    flow.request.headers["user-agent"] = OPENCODE_UA.decode()
    flow.request.headers["x-session-affinity"] = session
    flow.request.headers["x-session-id"] = session
    return flow


def kimi_cli_turn(session: str, encoded: bool = False) -> http.HTTPFlow:
    flow = kimi_flow()
    flow.request.path = "/coding/v1/chat/completions"
    flow.request.headers["user-agent"] = KIMI_UA.decode()
    flow.request.content = kimi_cli_body(session)
    if encoded:
        flow.request.headers["content-encoding"] = "gzip"  # not read: headers only then
    return flow


def plain_request() -> http.HTTPFlow:
    flow = kimi_flow()
    flow.request.content = b'{"model":"kimi-for-coding","messages":[]}'
    return flow


def set_strategy(tmp_path: Path, strategy: str, keys: list[str] = KEYS) -> None:
    storage.write_accounts(
        tmp_path / "accounts.json",
        AccountsFile(accounts=[Account(key=k, name=f"Account {i}") for i, k in enumerate(keys)],
                     rotation_strategy=strategy),
    )


async def send(clock: FakeClock, upstream: FakeUpstream, *flows: http.HTTPFlow) -> list[str]:
    """Send flows one after the other; the key each one's final answer came from."""
    keys = []
    for flow in flows:
        before = len(upstream.seen)
        await run_virtual(clock, upstream(flow))
        assert flow.response is not None and flow.response.status_code == 200, flow.comment
        keys.append(upstream.seen[-1][1])
        assert len(upstream.seen) > before
    return keys


def ok(flow: http.HTTPFlow, key: str) -> http.Response:
    return success()


# -- one conversation, one key ----------------------------------------------------------------


async def test_round_robin_keeps_a_conversation_on_one_key_and_alternates_the_rest(proxy, clock) -> None:
    addon, upstream = proxy(ok)  # round-robin over three keys
    turns = await send(clock, upstream, *(claude_turn("conv-a") for _ in range(5)))
    assert len(set(turns)) == 1  # without affinity: five turns on three keys, every cache missed
    plain = await send(clock, upstream, *(plain_request() for _ in range(6)))
    assert [KEYS.index(k) for k in plain] in ([0, 1, 2, 0, 1, 2], [1, 2, 0, 1, 2, 0], [2, 0, 1, 2, 0, 1])


async def test_affinity_off_is_todays_per_request_choice(proxy, clock) -> None:
    addon, upstream = proxy(ok, kimi_affinity=False)
    turns = await send(clock, upstream, *(claude_turn("conv-a") for _ in range(6)))
    assert [KEYS.index(k) for k in turns] == [0, 1, 2, 0, 1, 2]
    assert len(addon.pins) == 0


@pytest.mark.parametrize("strategy", ["health-based", "round-robin"])
async def test_new_conversations_spread_two_per_key_and_each_stays(tmp_path, proxy, clock, strategy) -> None:
    addon, upstream = proxy(ok)
    set_strategy(tmp_path, strategy)
    addon.sync.load()
    where: dict[str, set[str]] = {}
    for turn in range(5):
        for c in range(6):
            flow = claude_turn(f"conv-{c}") if c % 2 else opencode_turn(f"ses_{c}")
            (key,) = await send(clock, upstream, flow)
            where.setdefault(str(c), set()).add(key)
            if turn:
                assert flow.comment.endswith("pinned"), flow.comment
    assert all(len(keys) == 1 for keys in where.values())  # each conversation on one key
    per_key = Counter(next(iter(keys)) for keys in where.values())
    assert sorted(per_key.values()) == [2, 2, 2]  # and two per key
    assert addon.pins.counts(clock.now) == {k: 2 for k in KEYS}


async def test_under_sticky_every_conversation_goes_to_the_sticky_key(tmp_path, proxy, clock) -> None:
    addon, upstream = proxy(ok)
    set_strategy(tmp_path, "sticky")
    addon.sync.load()
    keys = await send(clock, upstream, *(claude_turn(f"conv-{c}") for c in range(4)))
    assert set(keys) == {KEYS[0]}


async def test_kimi_cli_is_known_by_its_body_and_an_encoded_body_is_not_read(proxy, clock) -> None:
    addon, upstream = proxy(ok)
    keys = await send(clock, upstream, *(kimi_cli_turn("d3b07384-d9a0") for _ in range(4)))
    assert len(set(keys)) == 1
    assert [s.client for s in addon.pins.sessions(clock.now, str)] == ["kimi-cli"]
    encoded = await send(clock, upstream, *(kimi_cli_turn("e5f", encoded=True) for _ in range(3)))
    assert len(set(encoded)) == 3  # no conversation: per request, round-robin
    assert len(addon.pins) == 1


# -- fail over, then stay ------------------------------------------------------------------


async def test_a_refused_turn_goes_elsewhere_and_the_conversation_stays_there(proxy, clock) -> None:
    refusing: set[str] = set()

    def answer(flow: http.HTTPFlow, key: str) -> http.Response:
        if key in refusing:
            return kimi_error(429, "rate limited", {"retry-after": "60"})
        return success()

    addon, upstream = proxy(answer)
    (first,) = await send(clock, upstream, claude_turn("conv-a"))
    refusing.add(first)
    moved = claude_turn("conv-a")
    (second,) = await send(clock, upstream, moved)
    assert second != first  # the client got the other key's answer, no error
    assert moved.comment.endswith("moved"), moved.comment
    refusing.clear()
    clock.advance(120_000)  # the first key has long recovered: the conversation does not bounce back
    later = await send(clock, upstream, *(claude_turn("conv-a") for _ in range(3)))
    assert set(later) == {second}
    assert addon.pins.sessions(clock.now, str)[0].moves == 1


async def test_a_turn_whose_key_is_at_its_cap_moves_without_waiting(proxy, clock) -> None:
    hanging: list[str] = []

    def answer(flow: http.HTTPFlow, key: str) -> http.Response | None:
        if flow.request.headers.get("x-hang"):
            hanging.append(key)
            return None  # in flight until cancelled
        return success()

    addon, upstream = proxy(answer, kimi_max_in_flight=1)
    (first,) = await send(clock, upstream, claude_turn("conv-a"))
    busy = claude_turn("conv-a")
    busy.request.headers["x-hang"] = "1"
    task = asyncio.ensure_future(upstream(busy))
    for _ in range(20):
        await asyncio.sleep(0)
    assert hanging == [first]
    (second,) = await send(clock, upstream, claude_turn("conv-a"))
    assert second != first
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- a person's choice, a key removed ------------------------------------------------------


async def test_use_key_moves_every_conversation_and_new_ones_spread_again(proxy, clock) -> None:
    addon, upstream = proxy(ok)
    await send(clock, upstream, *(claude_turn(f"conv-{c}") for c in range(3)))
    assert len(addon.pins.counts(clock.now)) == 3
    addon.commands.use(2)
    assert addon.pins.counts(clock.now) == {KEYS[2]: 3}
    keys = await send(clock, upstream, *(claude_turn(f"conv-{c}") for c in range(3)))
    assert keys == [KEYS[2]] * 3
    fresh = await send(clock, upstream, *(claude_turn(f"new-{c}") for c in range(2)))
    assert KEYS[2] not in fresh and len(set(fresh)) == 2


def test_a_key_leaving_the_pool_releases_its_conversations_and_the_clis_use_key_moves_them() -> None:
    clock = FakeClock()
    listeners = PoolListeners()  # as the assembly builds it: the pool first, its listeners joining
    pool = KeyPool(AccountsFile(accounts=[Account(key=k) for k in KEYS]), clock=clock, listener=listeners)
    table = PinTable()
    affinity = Affinity(pool, table)
    listeners.add(affinity)
    pool.adopt(pool.state)  # the first state seen: a stamp already there is no new choice
    for c, key in enumerate(KEYS):
        table.pin(f"conv-{c}", key, clock.now)
    pool.adopt(AccountsFile(accounts=[Account(key=k) for k in KEYS[1:]]))
    assert table.counts(clock.now) == {KEYS[1]: 1, KEYS[2]: 1}
    chosen = AccountsFile(accounts=[Account(key=k) for k in KEYS[1:]], active_index=1,
                          edited_at={"activeIndex": clock.now})  # `kimi-rotator use-key 1`, read from the file
    pool.adopt(chosen)
    assert table.counts(clock.now) == {KEYS[2]: 2}
    pool.adopt(chosen.model_copy(deep=True))  # the same choice read again moves nothing
    table.pin("conv-new", KEYS[1], clock.now)
    pool.adopt(chosen.model_copy(deep=True))
    assert table.counts(clock.now) == {KEYS[2]: 2, KEYS[1]: 1}
    assert affinity.table is table


def test_new_conversations_avoid_a_key_that_is_unhealthy_near_its_reserve_or_its_parallel_cap() -> None:
    from rotator.conversations.ids import Conversation
    from rotator.core.quota import QuotaReading, QuotaWindow

    clock = FakeClock()
    four = [*KEYS, "sk-kimi-" + "d" * 40]
    nearly_spent = QuotaReading(taken_at=clock.now, windows=[QuotaWindow(minutes=300, limit=100, used=97,
                                                                         reset_time=clock.now + 3_600_000)])
    pool = KeyPool(AccountsFile(accounts=[
        Account(key=four[0], health_score=20, last_used=clock.now),  # the strategies skip it
        Account(key=four[1], quota=nearly_spent),  # 3 % left, the reserve 1 %
        Account(key=four[2]),
        Account(key=four[3], quota=QuotaReading(taken_at=clock.now, parallel_limit=2)),
    ], rotation_strategy="round-robin"), clock=clock)
    pool.acquire_key(four[3], clock.now)  # one in flight of its two
    affinity = Affinity(pool, PinTable())
    went = []
    for c in range(3):
        turn, lease = affinity.begin(Conversation(f"c{c}", "x-session-id", "other"), clock.now)
        assert lease is not None
        went.append(four.index(lease.key))
    # A penalty outranks the count: while the only key with nothing against it can
    # serve, new conversations go there (the strategy alone would pick key 1).
    assert went == [2, 2, 2]
    pool.state.accounts[2].disabled_reason = "test"
    _, lease = affinity.begin(Conversation("c9", "x-session-id", "other"), clock.now)
    assert lease is not None and four.index(lease.key) in (1, 3)  # near a limit beats unhealthy


# -- a team's shared pins (rotator.sync.team_pins), with a store in a dict -------------------


class DictPins:
    """A team store's pins in a dict; `broken` makes every call fail as a lost store would."""

    def __init__(self) -> None:
        self.pins: dict[str, str] = {}
        self.broken = False

    async def recall(self, conversation_id: str, ttl_ms: int) -> str | None:
        if self.broken:
            raise ConnectionError("gone")
        return self.pins.get(conversation_id)

    async def remember(self, conversation_id: str, key_id: str, ttl_ms: int) -> None:
        if self.broken:
            raise ConnectionError("gone")
        self.pins[conversation_id] = key_id

    async def close(self) -> None:
        pass


async def test_a_team_pin_is_followed_and_this_proxys_pins_and_moves_are_told(caplog) -> None:
    from rotator.conversations.ids import Conversation
    from rotator.store.urls import key_id
    from rotator.sync.team_pins import SharedPins

    clock = FakeClock()
    pool = KeyPool(AccountsFile(accounts=[Account(key=k) for k in KEYS]), clock=clock)
    table = PinTable()
    affinity = Affinity(pool, table)
    store = DictPins()
    shared = SharedPins(store, table, pool, clock)
    affinity.pinned = shared.pinned
    theirs = Conversation("theirs", "x-claude-code-session-id", "claude-code")
    store.pins["theirs"] = key_id(KEYS[2])  # another proxy of the team pinned it
    await shared.recall(theirs)
    turn, lease = affinity.begin(theirs, clock.now)
    assert lease is not None and lease.key == KEYS[2] and turn.note().endswith("pinned")
    assert [v.turns for v in table.sessions(clock.now, str)] == [1]  # this turn, counted once
    ours = Conversation("ours", "x-session-affinity", "opencode")
    await shared.recall(ours)
    turn, lease = affinity.begin(ours, clock.now)  # new here and for the team
    assert lease is not None
    affinity.went_to(turn, KEYS[1] if lease.key != KEYS[1] else KEYS[0], clock.now)  # a retry moved it
    await shared._telling.stop(cancel=False)
    assert store.pins["ours"] == key_id(table.key_of("ours", clock.now) or "")
    del store.pins["ours"]  # the team's copy expired, ours is live: told again at the next turn
    await shared.recall(ours)
    await shared._telling.stop(cancel=False)
    assert "ours" in store.pins
    store.broken = True  # the store away: local pins only, said once
    for _ in range(3):
        await shared.recall(ours)
    assert affinity.begin(ours, clock.now)[1] is not None
    assert sum("does not share conversation pins" in r.message for r in caplog.records) == 1
    await shared.stop()


# -- options and what a person sees ----------------------------------------------------------


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_a_bad_affinity_ttl_stops_the_proxy_naming_the_option(tmp_path, value) -> None:
    with addon_in_taddons() as (addon, tctx):
        with pytest.raises(exceptions.OptionsError, match="kimi_affinity_ttl"):
            tctx.configure(addon, kimi_accounts=str(tmp_path / "a.json"), kimi_affinity_ttl=value)


async def test_a_silent_conversation_expires_after_the_ttl(proxy, clock) -> None:
    addon, upstream = proxy(ok, kimi_affinity_ttl="60")
    await send(clock, upstream, claude_turn("conv-a"))
    clock.advance(59_000)
    assert len(addon.pins) == 1 and addon.pins.expire(clock.now) == 0
    clock.advance(1_000)
    assert addon.pins.expire(clock.now) == 1


async def test_status_json_metrics_and_the_sessions_command_show_live_conversations(proxy, clock) -> None:
    addon, upstream = proxy(ok)
    await send(clock, upstream, claude_turn("0b7c6a1e-59f4-4b8e-9a51-2f8d3c1e7a90"), opencode_turn("ses_5f1d"))
    shot = addon.status_page.snapshot()
    doc = json.loads(document.status_json(shot))
    sessions = doc["sessions"]
    assert [(s["id"], s["client"], s["turns"]) for s in sessions] == [
        ("ses_5f1d", "opencode", 1), ("0b7c6a1e-59f…", "claude-code", 1)
    ]
    assert all(s["maskedKey"].startswith("sk-kim…") for s in sessions)
    assert not any(k in json.dumps(doc) for k in KEYS)  # only masked keys
    assert [k["sessions"] for k in doc["keys"]] == [1, 1, 0]
    text, _ = metrics.render_snapshot(shot)
    assert text.decode().count("kimi_rotator_key_sessions{") == 3
    lines = addon.commands.sessions()
    assert len(lines) == 2 and "claude-code on sk-kim…" in lines[1] and "1 turn" in lines[1]


async def test_with_affinity_off_nothing_is_listed(proxy, clock) -> None:
    addon, upstream = proxy(ok, kimi_affinity=False)
    await send(clock, upstream, claude_turn("conv-a"))
    assert json.loads(document.status_json(addon.status_page.snapshot()))["sessions"] == []
    assert addon.commands.sessions() == ["conversation affinity is off (kimi_affinity)"]

