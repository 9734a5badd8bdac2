"""Token accounting end to end (issue 26): a real mitmdump in front of the fake Kimi,
which reports a usage of its own in both shapes, streamed and not. What each key spent,
per the file, `stats --json` and /metrics, equals what the fake reported, exactly; two
proxies on one file add up exactly."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rotator.core.keys import mask_key
from testbed.fake_kimi import CHAT_COMPLETIONS_PATH, MESSAGES_PATH, FakeKimi
from testbed.processes import Proxy
from tests.support.harness import TOKEN_FIELDS, accounts_on_disk, poll, run_cli, tokens_on_disk

MSG = {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC = {"x-api-key": "sk-kimi-placeholder", "User-Agent": "claude-cli/2.0.14 (external, cli)"}
OPENAI = {"authorization": "Bearer sk-kimi-placeholder", "User-Agent": "KimiCLI/1.0"}
KINDS = {"input": "input", "output": "output", "cache_read": "cacheRead", "cache_write": "cacheWrite"}


def ask(c: httpx.Client, proxy: Proxy, path: str, stream: bool) -> None:
    """One request of each shape, read to its end, as an agent sends it."""
    headers = ANTHROPIC if path == MESSAGES_PATH else OPENAI
    with c.stream("POST", proxy.url + path, json={**MSG, "stream": stream}, headers=headers) as answer:
        body = answer.read()
        assert answer.status_code == 200, body
        if stream:
            assert answer.headers["content-type"].startswith("text/event-stream")


def every_kind(c: httpx.Client, proxy: Proxy, times: int) -> None:
    for _ in range(times):
        for path in (MESSAGES_PATH, CHAT_COMPLETIONS_PATH):
            for stream in (False, True):
                ask(c, proxy, path, stream)


def load_from_both(proxies: list[Proxy], times: int) -> None:
    """`every_kind` `times` over, from two clients per proxy at once."""

    def load(proxy: Proxy) -> None:
        with httpx.Client(trust_env=False, timeout=30) as c:
            every_kind(c, proxy, times)

    threads = [threading.Thread(target=load, args=(p,)) for p in proxies for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def test_what_kimi_reported_in_both_shapes_is_what_each_key_shows(
    fake_kimi: FakeKimi, keys, accounts_path, write_accounts, start_proxy
):
    fake_kimi.report_tokens(fresh=120, output=33, cache_read=4000, cache_write=250)
    write_accounts(keys, "round-robin")
    proxy = start_proxy(fake_kimi, options={"kimi_status": "127.0.0.1:0"})
    base = proxy.wait_for_output(r"status page at (http://127\.0\.0\.1:\d+)/", 5)
    assert base is not None, proxy.output()
    with httpx.Client(trust_env=False, timeout=30) as c:
        every_kind(c, proxy, 3)  # 12 answers: both shapes, streamed and not, over 3 keys
    reported = fake_kimi.tokens_reported()
    assert len(reported) == 3 and sum(r["output"] for r in reported.values()) == 12 * 33
    # The OpenAI shape has no cache-write figure: those answers count none.
    assert sum(r["cacheWrite"] for r in reported.values()) == 6 * 250
    assert poll(lambda: tokens_on_disk(accounts_path) == reported, 5), (tokens_on_disk(accounts_path), reported)

    with urllib.request.urlopen(base.group(1) + "/metrics", timeout=5) as answer:
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    metrics: dict[str, dict[str, int]] = {}
    for sample in families["kimi_rotator_key_tokens"].samples:
        metrics.setdefault(sample.labels["masked_key"], {})[KINDS[sample.labels["kind"]]] = int(sample.value)
    assert metrics == {mask_key(k): v for k, v in reported.items()}
    with urllib.request.urlopen(base.group(1) + "/status.json", timeout=5) as answer:
        page = {k["maskedKey"]: k for k in json.loads(answer.read())["keys"]}
    assert {m: k["tokens"] for m, k in page.items()} == {mask_key(k): v for k, v in reported.items()}
    proxy.stop()

    done = run_cli(accounts_path, "stats", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert {a["maskedKey"]: a["tokens"] for a in doc["accounts"]} == {mask_key(k): v for k, v in reported.items()}
    assert doc["totals"]["tokens"] == {n: sum(r[n] for r in reported.values()) for n in TOKEN_FIELDS}
    assert doc["totals"]["tokensToday"] == doc["totals"]["tokens"]
    # Per member only in team mode.
    assert all(a["memberTokens"] == {} for a in accounts_on_disk(accounts_path))


def test_the_flow_comment_ends_with_the_answers_tokens(fake_kimi: FakeKimi, keys, write_accounts, start_proxy,
                                                        tmp_path: Path):
    from tests.support.harness import saved_flows

    fake_kimi.report_tokens(fresh=1200, output=612, cache_read=41_000, cache_write=6000)
    write_accounts(keys[:1])
    dump = tmp_path / "flows.mitm"
    proxy = start_proxy(fake_kimi, extra_args=("-w", str(dump)))
    with httpx.Client(trust_env=False, timeout=30) as c:
        ask(c, proxy, MESSAGES_PATH, True)
        ask(c, proxy, CHAT_COMPLETIONS_PATH, False)
    proxy.stop()
    _, flows = saved_flows(dump)
    comments = [f.comment for f in flows]
    assert comments[0].endswith(" → success · in 48.2k (cached 41.0k) · out 612"), comments
    assert comments[1].endswith(" → success · in 48.2k (cached 41.0k) · out 612"), comments


def test_two_proxies_on_one_file_add_their_tokens_up_exactly(
    fake_kimi: FakeKimi, keys, accounts_path, write_accounts, start_proxy
):
    fake_kimi.report_tokens(fresh=7, output=3, cache_read=11, cache_write=2)
    write_accounts(keys, "round-robin")
    fast = {"kimi_flush_interval": "0.05"}  # the two proxies' saves overlap often
    proxies = [start_proxy(fake_kimi, options=fast), start_proxy(fake_kimi, options=fast)]

    load_from_both(proxies, 10)
    reported = fake_kimi.tokens_reported()
    assert sum(r["output"] for r in reported.values()) == 160 * 3
    # Already merged while both run, before any final save.
    assert poll(lambda: tokens_on_disk(accounts_path) == reported, 5), (tokens_on_disk(accounts_path), reported)
    for proxy in proxies:
        proxy.stop()
    assert tokens_on_disk(accounts_path) == reported
    today = [a["dailyTokens"] for a in accounts_on_disk(accounts_path)]
    assert sum(sum(d["input"] for d in days.values()) for days in today) == 160 * 20


def test_two_proxies_on_one_team_store_add_their_tokens_up_exactly(redis_server, fake_kimi: FakeKimi, keys,
                                                                    start_proxy):
    from rotator.admin import ops
    from rotator.store.redis_store import RedisStore

    store = RedisStore(redis_server.url)
    for i, key in enumerate(keys):
        ops.run(store, ops.add_key(key, f"K{i}", i + 1))
    ops.run(store, ops.set_strategy("round-robin", 10))
    fake_kimi.report_tokens(fresh=5, output=2, cache_read=9, cache_write=1)
    proxies = [start_proxy(fake_kimi, options={"kimi_store": redis_server.url, "kimi_flush_interval": "0.05",
                                               "kimi_member": member}) for member in ("alice@one", "bob@two")]

    load_from_both(proxies, 5)
    reported = fake_kimi.tokens_reported()
    assert sum(r["output"] for r in reported.values()) == 80 * 2

    def stored() -> dict[str, dict[str, int]]:
        return {a.key: {n: a.tokens.get(n, 0) for n in TOKEN_FIELDS} for a in RedisStore(redis_server.url).read().accounts
                if a.tokens}

    assert poll(lambda: stored() == reported, 10), (stored(), reported)
    for proxy in proxies:
        proxy.stop()
    assert stored() == reported

    # Who spent what: each proxy's 40 answers (half of them Anthropic's, with a cache write).
    done = run_cli(None, "--store", redis_server.url, "stats", "--by-member", "--json")
    assert done.returncode == 0, done.stderr
    members = {m["member"]: m for m in json.loads(done.stdout)["members"]}
    each = {"input": 40 * 15, "output": 40 * 2, "cacheRead": 40 * 9, "cacheWrite": 20 * 1}
    assert {name: m["tokensLast7Days"] for name, m in members.items()} == {"alice@one": each, "bob@two": each}
    assert all(m["tokensToday"] == each for m in members.values())
    per_key: dict[str, dict[str, int]] = {}
    for member in members.values():
        for key in member["keys"]:
            total = per_key.setdefault(key["maskedKey"], dict.fromkeys(TOKEN_FIELDS, 0))
            for name in TOKEN_FIELDS:
                total[name] += key["tokensLast7Days"][name]
    assert per_key == {mask_key(k): v for k, v in reported.items()}
    page = run_cli(None, "--store", redis_server.url, "stats", "--by-member")
    assert "alice@one\n   Last 7 Days: in 600 · out 80 · cache read 360 (60%) · cache write 20" in page.stdout, page.stdout
