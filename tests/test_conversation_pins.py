"""The pin table (rotator.conversations.pins): spread, stay, fail over and stay, expiry,
the bound, a person's choice, and counts that always match the pins. Times are given
explicitly: no sleeps, no clock."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from rotator.conversations.pins import DEFAULT_MAX_CONVERSATIONS, DEFAULT_TTL_MS, PinTable, short_id

KEYS = ["sk-kimi-aaaaaaaaaaaaaaaa", "sk-kimi-bbbbbbbbbbbbbbbb", "sk-kimi-cccccccccccccccc"]
A, B, C = KEYS
MIN = 60_000
T0 = 1_700_000_000_000


def start(table: PinTable, cid: str, now: int, candidates: list[str] = KEYS, **kw: object) -> str:
    """What the proxy does for a request: the pinned key, else choose and pin."""
    key = table.pin_for(cid, now)
    if key is None:
        key = table.choose_new(candidates, now, **kw)
        assert key is not None
        table.pin(cid, key, now)
    return key


def assert_consistent(table: PinTable, now: int) -> None:
    pins = {s.id: s for s in table.sessions(now, label=str)}
    assert len(pins) == len(table)
    assert table.counts(now) == dict(Counter(s.key for s in pins.values()))
    assert all(n > 0 for n in table.counts(now).values())
    assert len(table) <= table.max_conversations
    assert all(now - s.last_seen_ms < table.ttl_ms for s in pins.values())


def test_defaults() -> None:
    assert DEFAULT_TTL_MS == 30 * MIN and DEFAULT_MAX_CONVERSATIONS == 10_000


def test_six_conversations_over_three_keys_are_two_each_and_stay() -> None:
    table = PinTable()
    first = {f"c{i}": start(table, f"c{i}", T0 + i) for i in range(6)}
    assert table.counts(T0 + 10) == {A: 2, B: 2, C: 2}
    for turn in range(1, 5):  # every later turn on the conversation's key
        for cid, key in first.items():
            assert start(table, cid, T0 + turn * MIN) == key
    assert table.counts(T0 + 5 * MIN) == {A: 2, B: 2, C: 2}
    assert {s.turns for s in table.sessions(T0 + 5 * MIN, label=str)} == {5}


def test_ties_go_to_the_strategys_choice_then_the_order_given() -> None:
    table = PinTable()
    assert table.choose_new(KEYS, T0, preferred=B) == B
    assert table.choose_new(KEYS, T0) == A
    table.pin("c1", B, T0)
    assert table.choose_new(KEYS, T0, preferred=B) == A  # fewer beats preferred
    assert table.choose_new([], T0) is None


def test_a_key_with_a_penalty_is_a_worse_choice_even_when_emptier() -> None:
    table = PinTable()
    for i in range(3):
        table.pin(f"a{i}", A, T0)
    # B near its quota reserve (1), C at its parallel limit (2): A still takes it
    assert table.choose_new(KEYS, T0, penalty={B: 1, C: 2}) == A
    assert table.choose_new(KEYS, T0, penalty={C: 2}) == B
    assert table.choose_new([C], T0, penalty={C: 2}) == C  # the only one is still a choice


def test_fail_over_repins_and_the_conversation_does_not_bounce_back() -> None:
    table = PinTable()
    assert start(table, "c1", T0) == A
    table.moved("c1", B, T0 + MIN)  # A refused; the turn went to B
    assert table.counts(T0 + MIN) == {B: 1}
    for turn in range(2, 6):  # A serves again: c1 stays on B, where its cache is
        assert start(table, "c1", T0 + turn * MIN) == B
    [view] = table.sessions(T0 + 6 * MIN, label=str)
    assert (view.key, view.moves, view.turns) == (B, 1, 5)


def test_moved_for_a_conversation_that_expired_meanwhile_pins_it() -> None:
    table = PinTable(ttl_ms=MIN)
    table.pin("c1", A, T0)
    table.moved("c1", B, T0 + 2 * MIN)
    assert table.pin_for("c1", T0 + 2 * MIN) == B and table.counts(T0 + 2 * MIN) == {B: 1}


def test_expiry_boundary() -> None:
    table = PinTable(ttl_ms=30 * MIN)
    table.pin("c1", A, T0)
    assert table.pin_for("c1", T0 + 30 * MIN - 1) == A  # refreshed: silent 1 ms less than the TTL
    assert table.counts(T0 + 60 * MIN - 2) == {A: 1}
    assert table.counts(T0 + 60 * MIN - 1) == {}  # 30 min of silence: gone
    assert table.pin_for("c1", T0 + 60 * MIN - 1) is None
    assert len(table) == 0


def test_expiry_drops_only_the_silent_ones_and_frees_their_keys() -> None:
    table = PinTable(ttl_ms=30 * MIN)
    table.pin("quiet", A, T0)
    table.pin("busy", B, T0)
    for minute in (10, 20, 30, 40):
        assert table.pin_for("busy", T0 + minute * MIN) == B
    assert table.counts(T0 + 40 * MIN) == {B: 1}
    assert table.pin_for("quiet", T0 + 40 * MIN) is None
    assert table.choose_new(KEYS, T0 + 40 * MIN) == A
    assert table.expire(T0 + 70 * MIN) == 1 and len(table) == 0


def test_a_clock_that_steps_back_does_not_unorder_the_table() -> None:
    table = PinTable(ttl_ms=30 * MIN)
    table.pin("c1", A, T0 + 10 * MIN)
    table.pin("c2", B, T0)  # the wall clock stepped back 10 min: counts as T0 + 10 min
    [newest, older] = table.sessions(T0 + 10 * MIN, label=str)
    assert (newest.id, newest.last_seen_ms) == ("c2", T0 + 10 * MIN)
    assert table.counts(T0 + 40 * MIN - 1) == {A: 1, B: 1}
    assert table.counts(T0 + 40 * MIN) == {}


def test_the_bound_drops_the_conversation_seen_longest_ago() -> None:
    table = PinTable(max_conversations=3)
    for i, key in enumerate([A, B, C]):
        table.pin(f"c{i}", key, T0 + i)
    assert table.pin_for("c0", T0 + 10) == A  # c0 seen again: c1 is now the oldest
    table.pin("c3", C, T0 + 11)
    assert len(table) == 3
    assert table.pin_for("c1", T0 + 12) is None
    assert table.counts(T0 + 12) == {A: 1, C: 2}


def test_forget_key_releases_its_conversations() -> None:
    table = PinTable()
    for i in range(6):
        start(table, f"c{i}", T0 + i)
    assert table.forget_key(B) == 2
    assert table.counts(T0 + 10) == {A: 2, C: 2}
    released = [f"c{i}" for i in range(6) if table.pin_for(f"c{i}", T0 + 11) is None]
    assert len(released) == 2
    for cid in released:  # new again: they spread over what is left
        assert start(table, cid, T0 + 12, candidates=[A, C]) in (A, C)
    assert table.counts(T0 + 12) == {A: 3, C: 3}
    assert table.forget_key("sk-kimi-unknown") == 0


def test_move_all_to_moves_every_live_conversation_then_new_ones_spread_again() -> None:
    table = PinTable()
    for i in range(6):
        start(table, f"c{i}", T0 + i)
    assert table.move_all_to(C, T0 + MIN) == 4
    assert table.counts(T0 + MIN) == {C: 6}
    for i in range(6):
        assert table.pin_for(f"c{i}", T0 + 2 * MIN) == C  # at its next turn, on the chosen key
    new = [start(table, f"n{i}", T0 + 3 * MIN) for i in range(4)]
    assert sorted(new) == sorted([A, A, B, B])  # spread over the emptier keys
    assert table.move_all_to(A, T0 + 4 * MIN) == 8  # the person's choice wins again
    assert table.counts(T0 + 4 * MIN) == {A: 10}
    assert PinTable().move_all_to(A, T0) == 0


def test_sessions_view_shortens_ids_and_shows_keys_through_the_label() -> None:
    table = PinTable()
    long_id = "0b7c6a1e-59f4-4b8e-9a51-2f8d3c1e7a90"
    table.pin(long_id, A, T0, client="claude-code")
    table.pin("short", B, T0 + 5)
    assert table.pin_for(long_id, T0 + 9) == A
    views = table.sessions(T0 + 10, label=lambda key: key[:6] + "…" + key[-4:])
    assert [(v.id, v.client, v.key, v.turns, v.last_seen_ms) for v in views] == [
        ("0b7c6a1e-59f…", "claude-code", "sk-kim…aaaa", 2, T0 + 9),
        ("short", "other", "sk-kim…bbbb", 1, T0 + 5),
    ]
    assert all(A not in repr(v) and B not in repr(v) for v in views)
    assert short_id("a" * 13) == "a" * 13 and short_id("a" * 14) == "a" * 12 + "…"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        PinTable(ttl_ms=0)
    with pytest.raises(ValueError):
        PinTable(max_conversations=0)


@pytest.mark.parametrize("seed", range(20))
def test_counts_match_the_pins_after_every_operation(seed: int) -> None:
    rng = random.Random(seed)
    table = PinTable(ttl_ms=10 * MIN, max_conversations=rng.choice([5, 20, 1000]))
    keys = [f"sk-kimi-{c * 16}" for c in "abcde"]
    cids = [f"c{i}" for i in range(40)]
    now = T0
    # what the table should hold: id -> (key, last seen), in the order last seen
    model: dict[str, tuple[str, int]] = {}

    def expire_model() -> None:
        for cid in [c for c, (_, seen) in model.items() if now - seen >= table.ttl_ms]:
            del model[cid]

    def touch(cid: str, key: str) -> None:
        if cid not in model and len(model) >= table.max_conversations:
            del model[next(iter(model))]
        model.pop(cid, None)
        model[cid] = (key, now)

    for _ in range(400):
        now += rng.choice([0, 1, 1000, MIN, 3 * MIN, 11 * MIN])
        op = rng.randrange(6)
        cid, key = rng.choice(cids), rng.choice(keys)
        expire_model()
        if op <= 1:
            got = table.pin_for(cid, now)
            assert got == (model[cid][0] if cid in model else None)
            if got is None:
                chosen = table.choose_new(keys, now, preferred=key)
                live = Counter(k for k, _ in model.values())
                assert chosen is not None and live[chosen] == min(live[k] for k in keys)
                table.pin(cid, chosen, now)
                touch(cid, chosen)
            else:
                touch(cid, got)
        elif op == 2:
            table.moved(cid, key, now)
            touch(cid, key)
        elif op == 3 and rng.random() < 0.2:
            table.forget_key(key)
            model = {c: v for c, v in model.items() if v[0] != key}
        elif op == 4 and rng.random() < 0.2:
            table.move_all_to(key, now)
            model = {c: (key, seen) for c, (_, seen) in model.items()}
        else:
            table.expire(now)
        assert table.counts(now) == dict(Counter(k for k, _ in model.values()))
        assert [(v.id, v.key, v.last_seen_ms) for v in table.sessions(now, label=str)] == \
            [(c, k, seen) for c, (k, seen) in reversed(model.items())]
        assert_consistent(table, now)
