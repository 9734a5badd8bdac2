"""The one merge rule: a proxy's change record applied to the state in the store."""

from rotator.admin import ops
from rotator.core import edit_stamps, merge
from rotator.core.clock import AHEAD_SLACK_MS
from rotator.core.models import Account, AccountsFile
from tests.support.accounts import KEYS, NOW



def state(count: int = 3, **top: object) -> AccountsFile:
    return AccountsFile(accounts=[Account(key=KEYS[i], name=f"k{i}") for i in range(count)], **top)


def test_counts_from_two_writers_add_up():
    disk = state(2)
    disk.accounts[0].total_requests = 10  # another proxy's counts
    change = merge.PoolChange()
    key_change = change.for_key(KEYS[0])
    key_change.add("total_requests", 3, NOW)
    key_change.add("successful_requests", 2, NOW)
    key_change.add("health_score", -11, NOW)
    merged = merge.apply(disk, change)
    assert merged.accounts[0].total_requests == 13
    assert merged.accounts[0].successful_requests == 2
    assert merged.accounts[0].health_score == 89


def test_health_stays_within_bounds():
    disk = state(1)
    disk.accounts[0].health_score = 10
    change = merge.PoolChange()
    change.for_key(KEYS[0]).add("health_score", -40, NOW)
    assert merge.apply(disk, change).accounts[0].health_score == 0


def test_the_later_deadline_wins_and_removed_keys_stay_removed():
    disk = state(3)
    disk.accounts[1].rate_limit_reset_time = NOW + 500
    change = merge.PoolChange()
    change.for_key(KEYS[1]).later("rate_limit_reset_time", NOW + 100, NOW)
    change.for_key("sk-kimi-FAKEremovedbyCLI0000000").add("total_requests", 4, NOW)
    merged = merge.apply(disk, change)
    assert merged.accounts[1].rate_limit_reset_time == NOW + 500
    assert [a.key for a in merged.accounts] == KEYS[:3]


def test_a_replaced_deadline_may_be_lower():
    disk = state(1)
    disk.accounts[0].rate_limit_reset_time = NOW + 60_000
    change = merge.PoolChange()
    change.for_key(KEYS[0]).set("rate_limit_reset_time", NOW + 5_000, NOW)
    assert merge.apply(disk, change).accounts[0].rate_limit_reset_time == NOW + 5_000


def test_a_cleared_value_is_saved_like_any_other():
    disk = state(1)
    disk.accounts[0].disabled_reason = "revoked"
    disk.accounts[0].cooldown_reason = "rate limited"
    change = merge.PoolChange()
    change.for_key(KEYS[0]).set("cooldown_reason", None, NOW)
    merged = merge.apply(disk, change)
    assert merged.accounts[0].cooldown_reason is None
    assert merged.accounts[0].disabled_reason == "revoked"  # untouched fields stay


def test_absorbing_keeps_order_sums_and_replacements():
    first, second = merge.KeyChange(), merge.KeyChange()
    first.add("total_requests", 2, NOW)
    first.set("rate_limit_reset_time", NOW + 1_000, NOW)  # lowered on purpose
    first.set("disabled_reason", "revoked", NOW)
    second.add("total_requests", 3, NOW + 5)
    second.later("rate_limit_reset_time", NOW + 2_000, NOW + 5)
    second.set("disabled_reason", None, NOW + 5)
    first.absorb(second)
    disk = state(1)
    disk.accounts[0].rate_limit_reset_time = NOW + 90_000
    merge.apply_to_account(disk.accounts[0], first)
    assert disk.accounts[0].total_requests == 5
    assert disk.accounts[0].rate_limit_reset_time == NOW + 2_000  # still a replacement, raised
    assert disk.accounts[0].disabled_reason is None


def test_strategy_names_and_order_come_from_the_store():
    disk = state(2, rotation_strategy="sticky")
    disk.accounts[0].name = "renamed"
    change = merge.PoolChange()
    change.for_key(KEYS[0]).add("total_requests", 1, NOW)
    merged = merge.apply(disk, change)
    assert merged.rotation_strategy == "sticky"
    assert merged.accounts[0].name == "renamed"


# -- a person's change wins by time ---------------------------------------------------

def disabled_by_proxy_at(at_ms: int) -> merge.PoolChange:
    change = merge.PoolChange()
    key_change = change.for_key(KEYS[0])
    key_change.set("disabled_reason", "HTTP 401: key not accepted", at_ms)
    key_change.set("consecutive_failures", 1, at_ms)
    key_change.add("total_requests", 1, at_ms)
    return change


def test_enable_key_after_the_proxy_disabled_it_survives_the_proxys_later_save():
    # The proxy disabled key 0 in memory at NOW; the person ran enable-key at NOW + 200,
    # before the proxy saved. The file never showed the key disabled.
    disk = state(1)
    message = ops.enable_key(0, NOW + 200)(disk)
    assert "was not disabled" in message
    merged = merge.apply(disk, disabled_by_proxy_at(NOW))
    assert merged.accounts[0].disabled_reason is None
    assert merged.accounts[0].consecutive_failures == 0
    assert merged.accounts[0].total_requests == 1  # counts are never undone


def test_a_proxy_change_made_after_the_persons_wins():
    disk = state(1)
    ops.enable_key(0, NOW)(disk)
    merged = merge.apply(disk, disabled_by_proxy_at(NOW + 1))
    assert merged.accounts[0].disabled_reason == "HTTP 401: key not accepted"


def test_clear_limits_survives_an_older_cooldown():
    disk = state(1)
    change = merge.PoolChange()
    key_change = change.for_key(KEYS[0])
    key_change.later("rate_limit_reset_time", NOW + 60_000, NOW)
    key_change.set("cooldown_reason", "rate limited", NOW)
    key_change.set("cooldown_level", 1, NOW)
    ops.clear_limits(0, NOW + 10)(disk)
    merged = merge.apply(disk, change)
    account = merged.accounts[0]
    assert (account.rate_limit_reset_time, account.cooldown_reason, account.cooldown_level) == (0, None, 0)


def test_use_key_survives_an_older_move_of_the_proxy():
    disk = state(3)
    change = merge.PoolChange()
    change.move_active(KEYS[1], NOW)  # the proxy moved off key 0
    ops.use_key(0, NOW + 50)(disk)
    assert merge.apply(disk, change).active_index == 0
    later = merge.PoolChange()
    later.move_active(KEYS[2], NOW + 100)
    assert merge.apply(disk, later).active_index == 2


# -- stamps from the future count as now ------------------------------------------------

HOUR = 3_600_000


def test_a_stamp_from_the_future_reads_as_now_and_is_written_so():
    disk = state(1)
    ops.enable_key(0, NOW + HOUR)(disk)  # a clock an hour ahead, a hand edit, an import
    read = merge.syncing(merge.PoolChange(), NOW)(disk)  # a store step at NOW: something to write
    # Read as now less the slack: the clocks agree only that far, and a proxy change made
    # from the moment it is read on must win.
    clamped = NOW - AHEAD_SLACK_MS
    assert read is not None and read.accounts[0].edited_at == {"disabledReason": clamped, "consecutiveFailures": clamped}
    # From then on a proxy change made after it wins ...
    merged = merge.syncing(disabled_by_proxy_at(NOW + 1), NOW + 5)(disk)
    assert merged is not None and merged.accounts[0].disabled_reason == "HTTP 401: key not accepted"
    # ... and one made well before it still loses, as it could not have known.
    disk = state(1)
    ops.enable_key(0, NOW + HOUR)(disk)
    merged = merge.syncing(disabled_by_proxy_at(NOW - AHEAD_SLACK_MS - 1), NOW)(disk)
    assert merged is not None and merged.accounts[0].disabled_reason is None


def test_a_stamp_a_little_ahead_is_believed_and_nothing_is_written_for_it():
    disk = state(1)
    ops.use_key(0, NOW + AHEAD_SLACK_MS)(disk)  # clocks a moment apart
    assert merge.syncing(merge.PoolChange(), NOW)(disk) is None
    assert not edit_stamps.stamps_ahead(disk, NOW) and edit_stamps.stamps_ahead(disk, NOW - 1)
    disk = state(2)
    ops.use_key(1, NOW + AHEAD_SLACK_MS)(disk)
    earlier = merge.PoolChange()
    earlier.move_active(KEYS[0], NOW + AHEAD_SLACK_MS - 1)
    merged = merge.syncing(earlier, NOW)(disk)
    assert merged is not None and merged.active_index == 1  # still the person's


def test_a_persons_edit_by_a_clock_ahead_is_stamped_with_the_stores_time():
    disk = state(2)
    disk.edited_at["rotationStrategy"] = NOW + HOUR  # already there, from the future

    def enable_key_1(state: AccountsFile) -> AccountsFile:
        ops.enable_key(1, NOW + HOUR)(state)  # the CLI's clock, an hour ahead
        return state

    edited = merge.editing(enable_key_1, NOW)(disk)
    assert edited is not None
    assert edited.edited_at["rotationStrategy"] == NOW - AHEAD_SLACK_MS
    assert set(edited.accounts[1].edited_at.values()) == {NOW - AHEAD_SLACK_MS}
    # Nothing else to do, yet a stamp from the future to put right: written.
    disk.edited_at["rotationStrategy"] = NOW + HOUR
    assert merge.editing(lambda s: None, NOW)(disk) is disk and disk.edited_at["rotationStrategy"] == NOW - AHEAD_SLACK_MS
    assert merge.editing(lambda s: None, NOW)(disk) is None


def test_a_change_timed_by_a_clock_behind_the_stores_is_compared_on_the_stores_clock():
    disk = state(1)
    ops.enable_key(0, NOW)(disk)  # stamped by the server's clock
    made_after = disabled_by_proxy_at(NOW + 10 - HOUR)  # 10 ms later, by a clock an hour behind
    merged = merge.syncing(made_after, NOW + 20, skew_ms=HOUR)(disk)
    assert merged is not None and merged.accounts[0].disabled_reason == "HTTP 401: key not accepted"
    disk = state(1)
    ops.enable_key(0, NOW)(disk)
    made_before = disabled_by_proxy_at(NOW - 10 - HOUR)
    merged = merge.syncing(made_before, NOW + 20, skew_ms=HOUR)(disk)
    assert merged is not None and merged.accounts[0].disabled_reason is None
