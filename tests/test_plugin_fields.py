"""The TypeScript plugin's fields, honoured and kept (issue 10, item 1): billing limits
cool a key like rate limits, successes fill dailyRequests and responseTimes (merged
across proxies by the one rule table), and the file's health-refresh settings drive
resting recovery. The file we write is checked against the plugin's schema
(`src/types.ts`): by its real zod under Node (`plugin_parse`; zod 3 installed with npm
into a temporary folder once per session: these tests fail, never skip, without node and
npm) and by its rules written out in Python (`plugin_schema_problems`)."""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from rotator.core import merge, policy, stats
from rotator.core.health import effective_health
from rotator.core.key_view import view_pool
from rotator.core.models import Account, AccountsFile
from rotator.core.strategies import Shortage, Unavailable, choose_key
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.store import file as storage
from testbed.fake_kimi import MESSAGES_PATH
from tests.support.accounts import DAY, HOUR, NOW, TODAY
from tests.support.harness import accounts_on_disk, poll, run_cli
from tests.support.plugin_files import PLUGIN_KEYS, on_disk, plugin_account, plugin_file
from tests.support.node import npm_install

OK = policy.classify(200, {}, b"{}", NOW)
MSG = {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


# -- the plugin's schema, from /tmp/plugin/src/types.ts ----------------------------------

# src/types.ts of opencode-kimi-rotator v1.2.10 (MIT), as JavaScript; prints what the
# plugin's loadConfig would get from the file named by argv[2].
ZOD_SCRIPT = """
const { z } = require('zod');
const KimiAccountSchema = z.object({
  key: z.string().min(1),
  name: z.string().optional(),
  addedAt: z.number(),
  lastUsed: z.number(),
  rateLimitResetTime: z.number().default(0),
  billingLimitResetTime: z.number().default(0),
  healthScore: z.number().min(0).max(100).default(100),
  consecutiveFailures: z.number().default(0),
  consecutiveBillingLimitHits: z.number().default(0),
  totalRequests: z.number().default(0),
  successfulRequests: z.number().default(0),
  responseTimes: z.array(z.number()).default([]),
  dailyRequests: z.record(z.number()).default({}),
});
const KimiAccountsConfigSchema = z.object({
  version: z.number().default(1),
  accounts: z.array(KimiAccountSchema),
  activeIndex: z.number().default(0),
  rotationStrategy: z.enum(['round-robin', 'health-based', 'sticky']).default('health-based'),
  autoRefreshHealth: z.boolean().default(true),
  healthRefreshCooldownMinutes: z.number().min(1).max(1440).default(30),
});
const raw = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf-8'));
const parsed = KimiAccountsConfigSchema.safeParse(raw);
if (!parsed.success) { console.error(JSON.stringify(parsed.error.issues)); process.exit(3); }
console.log(JSON.stringify(parsed.data));
"""


@pytest.fixture(scope="session")
def zod_folder(tmp_path_factory) -> Path:
    folder = npm_install(tmp_path_factory, "zod@3")
    (folder / "schema.js").write_text(ZOD_SCRIPT)
    return folder


def plugin_parse(zod_folder: Path, path: Path) -> dict[str, Any]:
    """The file as the plugin's own zod schema parses it (fails the test if it refuses)."""
    done = subprocess.run([shutil.which("node") or "node", str(zod_folder / "schema.js"), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the plugin's schema refuses {path}: {done.stderr}"
    return json.loads(done.stdout)

_ACCOUNT_NUMBERS = (
    "addedAt", "lastUsed", "rateLimitResetTime", "billingLimitResetTime", "healthScore",
    "consecutiveFailures", "consecutiveBillingLimitHits", "totalRequests", "successfulRequests",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plugin_schema_problems(doc: Any) -> list[str]:
    """What the plugin's KimiAccountsConfigSchema (zod) would reject; [] when it accepts."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["not an object"]
    for name in ("version", "activeIndex"):
        if name in doc and not _is_number(doc[name]):
            problems.append(f"{name}: not a number")
    if doc.get("rotationStrategy", "health-based") not in ("round-robin", "health-based", "sticky"):
        problems.append("rotationStrategy: not one of the three")
    if not isinstance(doc.get("autoRefreshHealth", True), bool):
        problems.append("autoRefreshHealth: not a boolean")
    minutes = doc.get("healthRefreshCooldownMinutes", 30)
    if not _is_number(minutes) or not 1 <= minutes <= 1440:
        problems.append("healthRefreshCooldownMinutes: not a number in 1..1440")
    accounts = doc.get("accounts")
    if not isinstance(accounts, list):
        return [*problems, "accounts: not an array"]
    for i, account in enumerate(accounts):
        if not isinstance(account, dict):
            problems.append(f"accounts[{i}]: not an object")
            continue
        if not isinstance(account.get("key"), str) or not account["key"]:
            problems.append(f"accounts[{i}].key: not a non-empty string")
        if "name" in account and not isinstance(account["name"], str):
            problems.append(f"accounts[{i}].name: not a string")
        for name in _ACCOUNT_NUMBERS:
            required = name in ("addedAt", "lastUsed")
            if (required or name in account) and not _is_number(account.get(name)):
                problems.append(f"accounts[{i}].{name}: not a number")
        health = account.get("healthScore", 100)
        if _is_number(health) and not 0 <= health <= 100:
            problems.append(f"accounts[{i}].healthScore: outside 0..100")
        times = account.get("responseTimes", [])
        if not isinstance(times, list) or not all(_is_number(t) for t in times):
            problems.append(f"accounts[{i}].responseTimes: not an array of numbers")
        daily = account.get("dailyRequests", {})
        if not isinstance(daily, dict) or not all(_is_number(n) for n in daily.values()):
            problems.append(f"accounts[{i}].dailyRequests: not a record of numbers")
    return problems


# -- round trip ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_file_the_plugin_wrote_keeps_every_field_through_our_write(tmp_path, zod_folder):
    path = tmp_path / "kimi-accounts.json"
    written = plugin_file(path, [
        plugin_account(PLUGIN_KEYS[0], "Personal", billingLimitResetTime=NOW + HOUR, consecutiveBillingLimitHits=2,
                       healthScore=40, consecutiveFailures=1, totalRequests=12, successfulRequests=9,
                       responseTimes=[812, 1290.5, 604], dailyRequests={"2027-01-14": 4, TODAY: 5}),
        plugin_account(PLUGIN_KEYS[1], "Work", rateLimitResetTime=NOW + 60_000, totalRequests=3, successfulRequests=3,
                       responseTimes=[350], dailyRequests={TODAY: 3}),
    ], rotationStrategy="sticky", autoRefreshHealth=False, healthRefreshCooldownMinutes=45)

    result = run_cli(path, "use-key", "1", in_process=True)

    assert result.returncode == 0, result.stderr
    after = on_disk(path)
    assert after["activeIndex"] == 1
    for name in ("version", "rotationStrategy", "autoRefreshHealth", "healthRefreshCooldownMinutes"):
        assert after[name] == written[name], name
    for before, now in zip(written["accounts"], after["accounts"], strict=True):
        assert {k: now[k] for k in before} == before
    assert plugin_schema_problems(after) == []
    assert plugin_parse(zod_folder, path)["accounts"] == written["accounts"]


def test_a_file_without_the_new_fields_gets_the_plugins_defaults(tmp_path):
    path = tmp_path / "kimi-accounts.json"
    storage.write_accounts(path, AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0], name="One")]))
    doc = on_disk(path)
    assert (doc["autoRefreshHealth"], doc["healthRefreshCooldownMinutes"]) == (True, 30)
    account = doc["accounts"][0]
    assert (account["billingLimitResetTime"], account["consecutiveBillingLimitHits"]) == (0, 0)
    assert (account["responseTimes"], account["dailyRequests"]) == ([], {})
    assert plugin_schema_problems(doc) == []


def test_a_cooldown_the_plugin_would_refuse_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "kimi-accounts.json"
    plugin_file(path, [plugin_account(PLUGIN_KEYS[0], "One")], healthRefreshCooldownMinutes=5000)
    before = path.read_bytes()
    result = run_cli(path, "use-key", "0", in_process=True)
    assert result.returncode != 0
    assert "healthRefreshCooldownMinutes" in result.stderr
    assert path.read_bytes() == before


# -- billingLimitResetTime ----------------------------------------------------------------


def test_a_billing_limited_key_is_not_used_before_its_reset(tmp_path):
    state = AccountsFile(
        accounts=[Account(key=k, name=f"k{i}") for i, k in enumerate(PLUGIN_KEYS)], rotation_strategy="round-robin"
    )
    state.accounts[0].billing_limit_reset_time = NOW + HOUR
    pool = KeyPool(state)
    served = []
    for _ in range(6):
        lease = pool.acquire(NOW)
        assert isinstance(lease, Lease)
        served.append(lease.index)
        pool.release(lease, OK, NOW)
    assert served == [1, 2, 1, 2, 1, 2]
    assert isinstance(pool.acquire(NOW + HOUR), Lease)


def test_the_later_of_rate_and_billing_deadlines_counts():
    accounts = [Account(key=PLUGIN_KEYS[0], rate_limit_reset_time=NOW + 60_000, billing_limit_reset_time=NOW + HOUR)]
    assert choose_key(accounts, "sticky", 0, NOW + 120_000) == Unavailable(Shortage.ALL_COOLING, NOW + HOUR)
    accounts[0].rate_limit_reset_time = NOW + 2 * HOUR
    assert choose_key(accounts, "sticky", 0, NOW + HOUR + 1) == Unavailable(Shortage.ALL_COOLING, NOW + 2 * HOUR)


def test_list_keys_shows_a_billing_limited_key_as_cooling_and_clear_limits_clears_both(tmp_path):
    path = tmp_path / "kimi-accounts.json"
    soon = int(time.time() * 1000) + HOUR
    plugin_file(path, [
        plugin_account(PLUGIN_KEYS[0], "Billed", billingLimitResetTime=soon, rateLimitResetTime=soon - 1000,
                       consecutiveBillingLimitHits=2),
        plugin_account(PLUGIN_KEYS[1], "Fine"),
    ])
    listed = run_cli(path, "list-keys", in_process=True)
    block = listed.stdout.split("[1] Fine")[0]
    assert "Cooling down (free in 59m" in block or "Cooling down (free in 1h" in block, listed.stdout
    assert "billing limit" in block
    as_json = json.loads(run_cli(path, "list-keys", "--json", in_process=True).stdout)
    assert as_json["accounts"][0]["cooling"] is True

    cleared = run_cli(path, "clear-limits", "0", in_process=True)

    assert cleared.returncode == 0, cleared.stderr
    account = on_disk(path)["accounts"][0]
    assert (account["rateLimitResetTime"], account["billingLimitResetTime"]) == (0, 0)
    assert account["consecutiveBillingLimitHits"] == 0
    assert "Status: ✓ Ready" in run_cli(path, "list-keys", in_process=True).stdout.split("[1] Fine")[0]


# -- what a success records ------------------------------------------------------------------


def test_a_success_records_today_and_its_response_time_and_resets_billing_hits():
    state = AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0], consecutive_billing_limit_hits=1)])
    pool = KeyPool(state)
    for took in (120, 340):
        lease = pool.acquire(NOW)
        pool.release(lease, OK, NOW, took)
    account = pool.accounts[0]
    assert account.daily_requests == {TODAY: 2}
    assert account.response_times == [120, 340]
    assert account.consecutive_billing_limit_hits == 0

    disk = AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0], consecutive_billing_limit_hits=1,
                                          daily_requests={TODAY: 5, "2027-01-14": 1}, response_times=[900])])
    merged = merge.apply(disk, pool.take_changes())
    saved = merged.accounts[0]
    assert saved.daily_requests == {TODAY: 7, "2027-01-14": 1}
    assert saved.response_times == [900, 120, 340]
    assert saved.consecutive_billing_limit_hits == 0


def test_a_failure_records_neither_a_day_nor_a_time():
    pool = KeyPool(AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0])]))
    lease = pool.acquire(NOW)
    pool.release(lease, policy.classify(500, {}, b"{}", NOW), NOW, 99)
    assert (pool.accounts[0].daily_requests, pool.accounts[0].response_times) == ({}, [])


def test_two_proxies_add_their_days_and_the_newest_100_times_are_kept():
    disk = AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0], daily_requests={TODAY: 1},
                                          response_times=list(range(90)))])
    proxies = [KeyPool(AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0])])) for _ in range(2)]
    for n, pool in enumerate(proxies):
        for i in range(10):
            pool.release(pool.acquire(NOW), OK, NOW, 1000 * (n + 1) + i)
    for pool in proxies:
        merge.apply(disk, pool.take_changes())
    saved = disk.accounts[0]
    assert saved.daily_requests == {TODAY: 21}
    assert saved.successful_requests == 20
    assert len(saved.response_times) == 100
    assert saved.response_times[-20:] == [*range(1000, 1010), *range(2000, 2010)]
    assert saved.response_times[0] == 10  # the oldest ten went


def test_a_failed_save_keeps_every_day_and_time_for_the_next():
    pool = KeyPool(AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0])]))
    pool.release(pool.acquire(NOW), OK, NOW, 100)
    taken = pool.take_changes()
    pool.release(pool.acquire(NOW + DAY), OK, NOW + DAY, 200)
    pool.give_back(taken)  # the save failed
    disk = merge.apply(AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0])]), pool.take_changes())
    assert disk.accounts[0].daily_requests == {TODAY: 1, "2027-01-16": 1}
    assert disk.accounts[0].response_times == [100, 200]


def test_days_older_than_90_are_dropped_when_saved():
    old = {(dt.date(2027, 1, 15) - dt.timedelta(days=back)).isoformat(): 1 for back in range(1, 120)}
    disk = AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0], daily_requests=dict(old))])
    pool = KeyPool(AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0])]))
    pool.release(pool.acquire(NOW), OK, NOW, 5)
    kept = merge.apply(disk, pool.take_changes()).accounts[0].daily_requests
    assert min(kept) == "2026-10-17"  # 90 days before 2027-01-15
    assert len(kept) == 91 and kept[TODAY] == 1


def test_the_date_is_made_once_per_day_and_is_the_utc_date(monkeypatch):
    made = []
    real = time.strftime
    monkeypatch.setattr(stats.time, "strftime", lambda *a: made.append(a) or real(*a))
    pool = KeyPool(AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0])]))
    midnight = NOW - 8 * HOUR + DAY  # 2027-01-16T00:00:00Z
    for at in (NOW, NOW + 1, midnight - 1, midnight - 1):
        pool.release(pool.acquire(at), OK, at, 1)
    pool.release(pool.acquire(midnight), OK, midnight, 1)
    assert pool.accounts[0].daily_requests == {TODAY: 4, "2027-01-16": 1}
    assert len(made) <= 2


# -- autoRefreshHealth and healthRefreshCooldownMinutes ----------------------------------------


def test_resting_recovery_follows_the_files_cooldown_minutes_and_switch():
    def rested(**top: Any) -> int:
        state = AccountsFile(accounts=[Account(key=PLUGIN_KEYS[0], health_score=20, health_rest_since=NOW)], **top)
        return view_pool(state, NOW + 2 * HOUR)[0].health

    assert rested() == 60  # 30 minutes per +10 by default
    assert rested(health_refresh_cooldown_minutes=60) == 40
    assert rested(health_refresh_cooldown_minutes=120) == 30
    assert rested(auto_refresh_health=False) == 20


def test_with_auto_refresh_off_a_weak_key_is_not_chosen_back_at_rest():
    accounts = [Account(key=PLUGIN_KEYS[0], health_score=20, health_rest_since=NOW),
                Account(key=PLUGIN_KEYS[1], health_score=35, health_rest_since=NOW)]
    state = AccountsFile(accounts=accounts, rotation_strategy="health-based", auto_refresh_health=False)
    pool = KeyPool(state)
    lease = pool.acquire(NOW + 10 * HOUR)
    assert isinstance(lease, Lease) and lease.index == 1
    assert effective_health(accounts[0], NOW + 10 * HOUR, 0) == 20
    on = KeyPool(AccountsFile(accounts=[a.model_copy() for a in accounts], rotation_strategy="health-based"))
    assert on.acquire(NOW + 10 * HOUR).index == 0  # recovered to 100, and first


# -- through a real mitmdump -----------------------------------------------------------------


def test_after_traffic_the_file_has_todays_counts_and_response_times(
    fake_kimi, keys, accounts_path, start_proxy, zod_folder
):
    plugin_file(accounts_path, [plugin_account(k, f"Key {i}", lastUsed=0) for i, k in enumerate(keys[:2])],
                rotationStrategy="round-robin")
    for key in keys[:2]:
        fake_kimi.set_response(key, 200, {"content": [{"type": "text", "text": "hi"}]}, delay=0.15)
    proxy = start_proxy(fake_kimi)
    with httpx.Client(trust_env=False, timeout=10) as c:
        statuses = [c.post(proxy.url + MESSAGES_PATH, json=MSG, headers={"x-api-key": "sk-kimi-placeholder"})
                    .status_code for _ in range(4)]
    assert statuses == [200] * 4, proxy.output()
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()

    def saved() -> list[dict[str, Any]] | None:
        accounts = accounts_on_disk(accounts_path)
        done = all(a["dailyRequests"].get(today) == 2 and len(a["responseTimes"]) == 2 for a in accounts)
        return accounts if done else None

    accounts = poll(saved, 3.0)
    assert accounts, accounts_on_disk(accounts_path)
    for account in accounts:
        assert all(150 <= t < 5000 and isinstance(t, int) for t in account["responseTimes"]), account
    assert plugin_schema_problems(on_disk(accounts_path)) == []
    as_plugin_reads_it = plugin_parse(zod_folder, accounts_path)["accounts"]
    assert [a["dailyRequests"][today] for a in as_plugin_reads_it] == [2, 2]
    assert [len(a["responseTimes"]) for a in as_plugin_reads_it] == [2, 2]
    shown = run_cli(accounts_path, "stats", in_process=True).stdout
    assert shown.count("Requests Today: 2") == 2 and "Requests Today: 4" in shown


def test_through_the_proxy_a_billing_limited_key_gets_no_request_and_keeps_its_deadline(
    fake_kimi, keys, accounts_path, start_proxy
):
    later = int(time.time() * 1000) + HOUR
    plugin_file(accounts_path, [
        plugin_account(keys[0], "Billed", billingLimitResetTime=later, consecutiveBillingLimitHits=2),
        plugin_account(keys[1], "Fine"),
        plugin_account(keys[2], "Also fine"),
    ], rotationStrategy="round-robin")
    proxy = start_proxy(fake_kimi)
    with httpx.Client(trust_env=False, timeout=10) as c:
        statuses = [c.post(proxy.url + MESSAGES_PATH, json=MSG, headers={"x-api-key": "sk-kimi-placeholder"})
                    .status_code for _ in range(6)]
    assert statuses == [200] * 6, proxy.output()
    assert [seen.key for seen in fake_kimi.message_requests()] == [keys[1], keys[2]] * 3
    saved = poll(lambda: [a for a in accounts_on_disk(accounts_path) if a.get("successfulRequests")], 3.0)
    assert len(saved) == 2
    billed = accounts_on_disk(accounts_path)[0]
    assert (billed["billingLimitResetTime"], billed["consecutiveBillingLimitHits"]) == (later, 2)


def test_a_response_time_runs_from_sending_to_the_headers_not_from_a_wait_for_a_key():
    read_at, headers_at = 1_790_000_000.0, 1_790_000_002.5
    assert stats.response_ms(read_at, headers_at) == 2500
    assert stats.response_ms(read_at, headers_at, int((read_at + 2) * 1000)) == 500  # waited 2 s for a key
    assert stats.response_ms(read_at, headers_at, NOW) == 2500  # a clock not the flow's is ignored
    assert stats.response_ms(None, headers_at) is None and stats.response_ms(read_at, None) is None
