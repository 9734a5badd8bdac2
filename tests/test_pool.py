"""The live pool: choosing, accounting, and merging our changes with the file's."""

from rotator.core import merge, policy
from rotator.core.models import Account, AccountsFile
from rotator.core.strategies import Shortage, Unavailable
from rotator.pool.key_pool import KeyPool
from tests.support.accounts import NOW, fake_keys

KEYS = fake_keys(4)
OK = policy.classify(200, {}, b"{}", NOW)
RATE_LIMITED = policy.classify(429, {"retry-after": "30"}, b"", NOW)
REVOKED = policy.classify(401, {}, b'{"error":{"message":"Invalid Authentication"}}', NOW)


def state(count=3, strategy="round-robin", **top) -> AccountsFile:
    accounts = [Account(key=KEYS[i], name=f"k{i}") for i in range(count)]
    return AccountsFile(accounts=accounts, rotation_strategy=strategy, **top)


def test_acquire_counts_the_attempt_and_moves_round_robin_on():
    pool = KeyPool(state())
    leases = [pool.acquire(NOW) for _ in range(4)]
    assert [lease.index for lease in leases] == [0, 1, 2, 0]
    assert [a.total_requests for a in pool.accounts] == [2, 1, 1]
    assert all(a.last_used == NOW for a in pool.accounts)


def test_counts_written_past_pydantic_read_as_if_assigned():
    # The pool writes a request's and a success's counts into Account's __dict__ (its
    # __setattr__ costs two Python calls): sound only while assignment is not validated.
    assert Account.model_config.get("validate_assignment") is False
    pool = KeyPool(state(count=1))
    pool.release(pool.acquire(NOW), OK, NOW + 5)
    account = pool.accounts[0]
    assert (account.total_requests, account.successful_requests, account.last_used) == (1, 1, NOW)
    assert {"total_requests", "successful_requests", "last_used"} <= account.model_fields_set
    written = account.model_dump(by_alias=True, exclude_unset=True)
    assert (written["totalRequests"], written["successfulRequests"], written["lastUsed"]) == (1, 1, NOW)
    assert Account.model_validate_json(account.model_dump_json()) == account
    assert AccountsFile.model_validate_json(pool.state.to_json()).accounts[0].total_requests == 1


def test_release_success_and_rate_limit():
    pool = KeyPool(state())
    first, second = pool.acquire(NOW), pool.acquire(NOW)
    assert pool.release(first, OK, NOW) is None
    event = pool.release(second, RATE_LIMITED, NOW)
    assert event is not None and "cooling for 30s, until " in event and "sk-kim…" in event
    assert KEYS[1] not in event
    a0, a1 = pool.accounts[0], pool.accounts[1]
    assert (a0.successful_requests, a0.health_score) == (1, 100)
    assert (a1.successful_requests, a1.health_score, a1.consecutive_failures) == (0, 85, 1)
    assert a1.rate_limit_reset_time == NOW + 30_000
    # The cooling key is skipped until its deadline.
    assert [pool.acquire(NOW + 1).index for _ in range(3)] == [2, 0, 2]
    others = {KEYS[0], KEYS[2]}
    # Not every key is cooling: two were tried. Said as it is, with when the cooling one frees.
    assert pool.acquire(NOW + 29_999, tried=others) == Unavailable(Shortage.ALL_SKIPPED, NOW + 30_000)
    assert pool.acquire(NOW + 30_000, tried=others).index == 1


def test_a_second_cooldown_keeps_the_later_deadline():
    pool = KeyPool(state(1))
    early, late = pool.acquire(NOW), pool.acquire(NOW)
    pool.release(early, policy.classify(429, {"retry-after": "600"}, b"", NOW), NOW)
    assert pool.acquire(NOW) == Unavailable(Shortage.ALL_COOLING, NOW + 600_000)
    # A request that was already in flight reports a shorter limit: the later one stays.
    pool.release(late, policy.classify(429, {"retry-after": "5"}, b"", NOW), NOW)
    assert pool.accounts[0].rate_limit_reset_time == NOW + 600_000


def test_cooldowns_in_a_row_grow_and_a_success_resets_them():
    pool = KeyPool(state(1))
    now = NOW
    deadlines = []
    for _ in range(3):
        lease = pool.acquire(now)
        assert not isinstance(lease, Unavailable)
        pool.release(lease, policy.classify(429, {}, b"", now), now)
        deadlines.append(pool.accounts[0].rate_limit_reset_time - now)
        now = pool.accounts[0].rate_limit_reset_time
    assert deadlines == [60_000, 120_000, 240_000]
    lease = pool.acquire(now)
    event = pool.release(lease, OK, now)
    assert event is not None and "recovered" in event
    lease = pool.acquire(now)
    pool.release(lease, policy.classify(429, {}, b"", now), now)
    assert pool.accounts[0].rate_limit_reset_time - now == 60_000


def test_an_announced_reset_grows_too_when_it_follows_another_cooldown():
    """The logic of test_e2e_failures' twice-as-long test on the fake clock, exactly: a
    key refused with retry-after-ms 400, back after it and refused again, cools 800 ms."""
    pool = KeyPool(state(2, strategy="sticky"))
    now = NOW
    announced = {"retry-after-ms": "400"}
    pool.release(pool.acquire(now), policy.classify(429, announced, b"", now), now)
    assert pool.accounts[0].rate_limit_reset_time == now + 400
    assert pool.accounts[0].cooldown_level == 1
    now += 400  # its cooldown is over: half-open, one request
    trial = pool.acquire(now)
    assert trial.index == 0
    pool.release(trial, policy.classify(429, announced, b"", now), now)
    assert pool.accounts[0].cooldown_level == 2
    assert pool.accounts[0].rate_limit_reset_time == now + 800  # twice the 400 announced


def test_backoff_is_capped_at_thirty_minutes():
    pool = KeyPool(state(1))
    pool.accounts[0].cooldown_level = 12
    pool.release(pool.acquire(NOW), policy.classify(429, {}, b"", NOW), NOW)
    assert pool.accounts[0].rate_limit_reset_time == NOW + 30 * 60_000


def test_a_key_back_from_a_cooldown_gets_one_request_at_a_time():
    pool = KeyPool(state(2, strategy="sticky"))
    pool.accounts[0].cooldown_level = 1  # its cooldown just ended: half-open
    probe = pool.acquire(NOW)
    assert probe.index == 0
    assert pool.acquire(NOW, tried={KEYS[1]}) == Unavailable(Shortage.ALL_SKIPPED)
    pool.release(probe, OK, NOW)
    assert pool.accounts[0].cooldown_level == 0
    assert [pool.acquire(NOW).index for _ in range(3)] == [0, 0, 0]


def test_a_burst_of_rate_limits_on_many_keys_pauses_everyone_once():
    pool = KeyPool(state(4))
    leases = [pool.acquire(NOW) for _ in range(4)]
    limited = policy.classify(429, {}, b"", NOW)
    pool.release(leases[0], limited, NOW)
    pool.release(leases[1], limited, NOW + 1000)
    event = pool.release(leases[2], limited, NOW + 2000)
    assert event is not None and "throttling" in event and "pausing all keys for 10 s" in event
    # Nobody is cooling on their own account, and no health was lost.
    assert [a.rate_limit_reset_time for a in pool.accounts] == [0, 0, 0, 0]
    assert [a.health_score for a in pool.accounts] == [100, 100, 100, 100]
    assert [a.cooldown_level for a in pool.accounts] == [0, 0, 0, 0]
    assert pool.acquire(NOW + 3000) == Unavailable(Shortage.THROTTLED, NOW + 12_000)
    # A late 429 from the same burst changes nothing.
    assert pool.release(leases[3], limited, NOW + 3000) is None
    assert pool.accounts[3].rate_limit_reset_time == 0
    assert not isinstance(pool.acquire(NOW + 12_000), Unavailable)
    # The refunds reach the file too: the lowered deadlines replace the raised ones.
    taken = pool.take_changes()
    disk = state(4)
    disk.accounts[0].rate_limit_reset_time = NOW + 60_000  # flushed before the refund
    merged = merge.apply(disk, taken)
    assert merged.accounts[0].rate_limit_reset_time == 0


def test_rate_limits_spread_over_time_are_charged_to_each_key():
    pool = KeyPool(state(3))
    leases = [pool.acquire(NOW) for _ in range(3)]
    limited = policy.classify(429, {}, b"", NOW)
    for i, lease in enumerate(leases):
        pool.release(lease, limited, NOW + i * 6000)
    assert pool.paused_until_ms == 0
    assert all(a.rate_limit_reset_time > NOW for a in pool.accounts)


def test_exact_reset_replaces_the_estimate():
    pool = KeyPool(state(2))
    lease = pool.acquire(NOW)
    weekly = policy.classify(403, {}, b'{"error":{"message":"You\'ve reached your weekly (7-day) usage limit"}}', NOW)
    pool.release(lease, weekly, NOW)
    assert pool.accounts[0].rate_limit_reset_time == NOW + 7 * 86_400_000
    event = pool.set_exact_reset(KEYS[0], NOW + 3_600_000, NOW)
    assert event is not None and "resets in 1h 00m, until " in event
    assert pool.accounts[0].rate_limit_reset_time == NOW + 3_600_000


def test_revoked_key_is_disabled_with_its_reason():
    pool = KeyPool(state(2))
    lease = pool.acquire(NOW)
    event = pool.release(lease, REVOKED, NOW)
    assert "disabled" in event and "enable-key" in event
    assert pool.accounts[0].disabled_reason == REVOKED.reason
    assert [pool.acquire(NOW).index for _ in range(3)] == [1, 1, 1]


def test_in_flight_cap_excludes_a_busy_key_until_it_answers():
    pool = KeyPool(state(2, strategy="sticky"), max_in_flight=2)
    held = [pool.acquire(NOW), pool.acquire(NOW)]
    assert [lease.index for lease in held] == [0, 0]
    only_first = {KEYS[1]}
    assert pool.acquire(NOW, tried=only_first) == Unavailable(Shortage.ALL_SKIPPED)
    pool.release(held[0], OK, NOW)
    assert pool.acquire(NOW, tried=only_first).index == 0


def test_tried_keys_are_skipped():
    pool = KeyPool(state(3, strategy="sticky"))
    assert pool.acquire(NOW, tried={KEYS[0]}).index == 1
    assert pool.acquire(NOW, tried=set(KEYS[:3])) == Unavailable(Shortage.ALL_SKIPPED)


def test_release_of_a_key_removed_meanwhile_is_ignored():
    pool = KeyPool(state(2))
    lease = pool.acquire(NOW)
    pool.adopt(state(0))
    assert pool.release(lease, OK, NOW) is None
    assert pool.in_flight == {}


# A key removed and added again is a new entry, whose counts start from zero: answers to
# requests sent with the old entry count on no entry (issue 23, item 6).


def re_added(total: int = 0, added_at: int = NOW + 5) -> AccountsFile:
    return AccountsFile(accounts=[Account(key=KEYS[0], name="again", added_at=added_at, total_requests=total)])


def test_answers_sent_with_a_removed_entry_count_on_no_entry_once_it_is_added_again():
    pool = KeyPool(state(1))
    leases = [pool.acquire(NOW) for _ in range(3)]  # counted, not saved yet
    pool.adopt(state(0))
    pool.adopt(re_added())
    for lease in leases:
        assert pool.release(lease, OK, NOW) is None
    again = pool.accounts[0]
    assert (again.total_requests, again.successful_requests, again.health_score) == (0, 0, 100)
    assert pool.in_flight == {}
    assert not pool.take_changes().keys  # nothing to save onto the new entry


def test_an_entry_replaced_between_two_reads_is_a_new_entry_too():
    # The proxy never saw the file without the key: its addedAt tells the entries apart.
    pool = KeyPool(AccountsFile(accounts=[Account(key=KEYS[0], added_at=NOW - 1000)]))
    stale = pool.acquire(NOW)
    taken = pool.take_changes()  # saved: the old entry has the request
    assert taken.keys[KEYS[0]].fields["total_requests"].value == 1
    pool.adopt(re_added())
    fresh = pool.acquire(NOW)
    assert pool.in_flight == {KEYS[0]: 2}  # one key at Kimi, whichever entry sent them
    pool.release(stale, OK, NOW)
    assert pool.in_flight == {KEYS[0]: 1}
    pool.release(fresh, OK, NOW)
    again = pool.accounts[0]
    assert (again.total_requests, again.successful_requests) == (1, 1)
    assert pool.in_flight == {}


def test_an_unsent_attempt_of_a_removed_entry_takes_nothing_from_the_new_one():
    pool = KeyPool(state(1))
    stale = pool.acquire(NOW)
    pool.take_changes()  # saved: the old entry has the attempt
    pool.adopt(re_added(total=4))
    pool.abandon(stale)
    assert pool.accounts[0].total_requests == 4
    assert pool.in_flight == {}


def test_the_same_entry_read_again_keeps_its_answers():
    pool = KeyPool(AccountsFile(accounts=[Account(key=KEYS[0], added_at=NOW - 1000)]))
    lease = pool.acquire(NOW)
    pool.adopt(merge.apply(AccountsFile(accounts=[Account(key=KEYS[0], added_at=NOW - 1000)]), pool.take_changes()))
    pool.release(lease, OK, NOW)
    assert (pool.accounts[0].total_requests, pool.accounts[0].successful_requests) == (1, 1)


# -- handing changes to the save loop -------------------------------------------------


def test_flush_cycle_loses_nothing_that_happened_during_the_write():
    pool = KeyPool(state(2))
    pool.release(pool.acquire(NOW), OK, NOW)
    taken = pool.take_changes()
    # While the write is in flight, another request completes.
    pool.release(pool.acquire(NOW), OK, NOW)
    on_disk = merge.apply(state(2), taken)  # what the worker thread wrote
    assert [a.total_requests for a in on_disk.accounts] == [1, 0]
    pool.adopt(on_disk)
    assert [a.total_requests for a in pool.accounts] == [1, 1]
    assert [a.successful_requests for a in pool.accounts] == [1, 1]
    # The next flush carries only the second request.
    taken = pool.take_changes()
    assert sum(c.fields["total_requests"].value for c in taken.keys.values()) == 1


def test_failed_flush_gives_its_changes_back():
    pool = KeyPool(state(1))
    pool.release(pool.acquire(NOW), OK, NOW)
    taken = pool.take_changes()
    pool.release(pool.acquire(NOW), OK, NOW)
    pool.give_back(taken)
    taken = pool.take_changes()
    assert taken.keys[KEYS[0]].fields["total_requests"].value == 2
    assert taken.keys[KEYS[0]].fields["successful_requests"].value == 2


def test_a_half_open_key_stays_held_while_an_earlier_request_is_still_out():
    pool = KeyPool(state(2, strategy="sticky"))
    first, second = pool.acquire(NOW), pool.acquire(NOW)
    pool.accounts[0].cooldown_level = 1  # it cooled and came back meanwhile
    neutral = policy.classify(400, {}, b'{"error":{"message":"bad request"}}', NOW)
    pool.release(first, neutral, NOW)
    # One request is still out on the recovering key: it takes no other.
    assert pool.acquire(NOW, tried={KEYS[1]}) == Unavailable(Shortage.ALL_SKIPPED)
    pool.release(second, neutral, NOW)
    assert pool.acquire(NOW, tried={KEYS[1]}).index == 0


def test_a_disabled_key_says_the_command_that_puts_it_back_by_index_naming_the_store():
    """Issue 27: the advice gives the index and reaches the store in use; a ban gets none."""
    pool = KeyPool(state())
    pool.cli = "kimi-rotator --accounts /srv/kimi.json"  # as the assembly sets it for that file
    leases = [pool.acquire(NOW) for _ in range(3)]
    event = pool.release(leases[1], REVOKED, NOW)
    assert event is not None and event.endswith("; run `kimi-rotator --accounts /srv/kimi.json enable-key 1` to use it again")
    banned = policy.classify(403, {}, b'{"error":{"message":"Access terminated under the community guidelines"}}', NOW)
    assert banned.verdict is policy.Verdict.ACCOUNT_BANNED
    event = pool.release(leases[2], banned, NOW)
    assert event is not None and "enable-key" not in event and "enabling the key again would not help" in event


def test_a_long_cooldown_says_the_day_and_clock_time(monkeypatch):
    import time

    from rotator.core.key_view import until_text

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        monday_noon = 1_797_249_600_000  # Mon 2026-12-14 12:00 UTC
        assert until_text(monday_noon, monday_noon - 7 * 86_400_000 + 60_000) == "6d 23h, until Mon 12:00"
        assert until_text(monday_noon, monday_noon - 252_000) == "4m 12s, until 12:00"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
