"""Quota polling through a real mitmdump in front of the fake Kimi: a key whose 5-hour
window is spent at start is never sent a request, the readings reach the accounts file,
Kimi's parallel limit caps a key, and the polls are saved as the proxy's own flows with
masked keys only."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from rotator.core.keys import mask_key
from testbed.fake_kimi import MESSAGES_PATH, USAGES_PATH
from tests.support.harness import accounts_on_disk, poll, saved_flows

MSG = {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"x-api-key": "sk-kimi-placeholder", "anthropic-version": "2023-06-01", "user-agent": "claude-cli/2.0"}
DEADLINE_S = 10


def send(c: httpx.Client, base: str) -> httpx.Response:
    return c.post(base + MESSAGES_PATH, json=MSG, headers=HEADERS)


def test_a_key_spent_at_start_is_never_sent_a_request(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path, tmp_path
):
    fake_kimi.set_usage(keys[0], five_hour_limit=200, five_hour_used=200, five_hour_reset=time.time() + 7200)
    fake_kimi.set_usage(keys[1], five_hour_limit=200, five_hour_used=199)  # within the 1 % reserve
    write_accounts(keys, strategy="round-robin")
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, options={"kimi_usage_interval": "300"}, extra_args=("-w", str(dump)))
    masked = [mask_key(k) for k in keys]
    proxy.wait_for_output(re.escape(f"{masked[0]}) cooling for"), timeout=DEADLINE_S)
    proxy.wait_for_output(re.escape(f"{masked[1]}) cooling for"), timeout=DEADLINE_S)

    with httpx.Client(trust_env=False, timeout=10) as c:
        for _ in range(9):
            r = send(c, proxy.url)
            assert r.status_code == 200, r.text
    served = [r.key for r in fake_kimi.message_requests()]
    assert served == [keys[2]] * 9, (served, proxy.output())

    def readings_saved() -> bool:
        return all(a.get("quota") for a in accounts_on_disk(accounts_path))

    assert poll(readings_saved, DEADLINE_S), accounts_on_disk(accounts_path)
    polled = [r.key for r in fake_kimi.requests if r.path.split("?")[0] == USAGES_PATH]
    assert sorted(polled) == sorted(keys)  # each once, at start
    on_disk = accounts_on_disk(accounts_path)
    five_hour = on_disk[0]["quota"]["windows"][0]
    assert (five_hour["minutes"], five_hour["limit"], five_hour["used"], five_hour["remaining"]) == (300, 200, 200, 0)
    assert on_disk[0]["cooldownReason"] == "5-hour quota spent (200 of 200 used), per Kimi's /usages"
    assert on_disk[0]["totalRequests"] == 0  # a poll is not a request
    assert on_disk[2]["totalRequests"] == 9
    assert proxy.stop() == 0, proxy.output()

    raw, flows = saved_flows(dump)
    for key in keys:
        assert key.encode() not in raw
    polls = [f for f in flows if f.request.path == USAGES_PATH]
    assert sorted(f.metadata["kimi_rotator"]["quota_poll"] for f in polls) == sorted(masked)
    assert all(f.request.headers["authorization"].startswith("Bearer sk-kim...") for f in polls)  # ASCII in headers


def test_kimis_parallel_limit_caps_a_key_for_the_whole_proxy(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    for key in keys:
        fake_kimi.set_usage(key, parallel_limit=2)
    fake_kimi.set_default(delay=0.3)
    write_accounts(keys, strategy="sticky")
    proxy = start_proxy(fake_kimi, options={"kimi_usage_interval": "300"})

    def all_read() -> bool:  # saved, so the proxy has taken them
        return all((a.get("quota") or {}).get("parallelLimit") == 2 for a in accounts_on_disk(accounts_path))

    assert poll(all_read, DEADLINE_S)
    gate = threading.Barrier(6)

    def one() -> int:
        with httpx.Client(trust_env=False, timeout=10) as c:
            gate.wait(5)
            return send(c, proxy.url).status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: one(), range(6)))
    assert statuses == [200] * 6
    assert max(fake_kimi.max_in_flight_by_key().values()) <= 2, fake_kimi.max_in_flight_by_key()


def test_done_when_the_page_the_usage_verb_and_metrics_agree_on_a_key_spent_at_start(
    fake_kimi, keys, write_accounts, start_proxy, accounts_path
):
    """The issue's acceptance: three keys, one with its 5-hour window spent at start. The
    status page shows it cooling until the window resets, requests never reach it,
    `kimi-rotator usage` shows the same numbers, and Prometheus can read /metrics."""
    import json
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.harness import run_cli

    reset_s = int(time.time()) + 3 * 3600
    fake_kimi.set_usage(keys[0], five_hour_limit=200, five_hour_used=200, five_hour_reset=reset_s)
    write_accounts(keys, strategy="round-robin")
    proxy = start_proxy(fake_kimi, options={"kimi_usage_interval": "300", "kimi_status": "127.0.0.1:0"})
    base = proxy.wait_for_output(r"status page at (http://127\.0\.0\.1:\d+)/", 5)
    assert base is not None, proxy.output()
    masked = mask_key(keys[0])

    def page() -> dict:
        with urllib.request.urlopen(base.group(1) + "/status.json", timeout=5) as answer:
            return json.loads(answer.read())

    def spent_key_cooling() -> bool:  # and every key read
        shown = page()["keys"]
        return shown[0]["state"] == "cooling" and all(key["quota"] is not None for key in shown)

    assert poll(spent_key_cooling, DEADLINE_S), page()
    shown = page()["keys"][0]
    assert shown["maskedKey"] == masked
    assert shown["untilMs"] == reset_s * 1000
    assert shown["reason"] == "5-hour quota spent (200 of 200 used), per Kimi's /usages"
    five_hour = next(w for w in shown["quota"]["windows"] if w["name"] == "5-hour")
    assert (five_hour["used"], five_hour["limit"], five_hour["remaining"]) == (200, 200, 0)

    with httpx.Client(trust_env=False, timeout=10) as c:
        for _ in range(6):
            assert send(c, proxy.url).status_code == 200
    assert keys[0] not in [r.key for r in fake_kimi.message_requests()]

    with urllib.request.urlopen(base.group(1) + "/metrics", timeout=5) as answer:
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    ratios = {(s.labels["index"], s.labels["window"]): s.value
              for s in families["kimi_rotator_key_quota_remaining_ratio"].samples}
    assert ratios[("0", "5-hour")] == 0.0
    assert ratios[("1", "5-hour")] > 0.9

    cli = run_cli(accounts_path, "usage", "--base-url", fake_kimi.url + "/coding")
    assert cli.returncode == 0, cli.stderr
    block = cli.stdout.split("\n\n")[0]
    assert masked in block and "200/200 used, 0 left" in block, cli.stdout
    for key in keys:
        assert key not in cli.stdout + cli.stderr
