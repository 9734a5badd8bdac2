"""The `usage` verb against a fake Kimi (in-process), and once for real through mitmdump as
an HTTPS proxy with its CA in SSL_CERT_FILE; and the reading it leaves in list-keys.

Nothing here reaches past 127.0.0.1: every in-process ask is checked to go there, and the
one run against https://api.kimi.com goes through a mitmdump whose loopback DNS shim
sends it to the fake.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import rotator.cli.main as cli
from rotator.cli import usage as usage_verb
from rotator.core.models import Account, AccountsFile
from rotator.core.quota import QuotaReading, QuotaWindow
from rotator.store import file as storage
from testbed.fake_kimi import USAGES_PATH, FakeKimi
from testbed.processes import start_mitmdump
from tests.support.harness import LOOPBACK_DNS, accounts_on_disk, run_cli

K0 = "sk-kimi-FAKEusagekey00000000000000a0"
K1 = "sk-kimi-FAKEusagekey00000000000000b1"
K2 = "sk-kimi-FAKEusagekey00000000000000c2"
KEYS = (K0, K1, K2)
MIN = 60_000
_ANY_KEY = re.compile(r"sk-kimi-[A-Za-z0-9_\-]{4,}")
_REAL_ASK = usage_verb.ask


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """No proxy from the environment, no base URL from it; every ask goes to 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "NO_PROXY", "no_proxy", usage_verb.BASE_URL_ENV):
        monkeypatch.delenv(name, raising=False)

    def ask(url: str, *args, **kwargs):
        assert urllib.parse.urlsplit(url).hostname == "127.0.0.1", url
        return _REAL_ASK(url, *args, **kwargs)

    monkeypatch.setattr(usage_verb, "ask", ask)


@pytest.fixture
def kimi():
    with FakeKimi() as server:
        yield server


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "config" / "kimi-accounts.json"


def pool(path: Path, keys=KEYS[:2], **fields) -> Path:
    names = ("Personal", "Work", "Spare")
    accounts = [Account(key=key, name=names[i], **fields.get(f"a{i}", {})) for i, key in enumerate(keys)]
    storage.write_accounts(path, AccountsFile(accounts=accounts))
    return path


def run(path: Path, *args: str):
    """The CLI in-process; no output of it may hold a full key."""
    result = run_cli(path, *args, in_process=True)
    for text in (result.stdout, result.stderr):
        assert not _ANY_KEY.search(text), text
        assert not any(key in text for key in KEYS)
    return result


def usage(path: Path, kimi: FakeKimi, *args: str):
    return run(path, "usage", "--base-url", kimi.base_url, *args)


def block(stdout: str, index: int) -> str:
    """The lines of the key at `index` in `usage`'s output (its label up to the blank line)."""
    start = stdout.index(f"[{index}] ")
    return stdout[start:stdout.index("\n\n", start)]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what it shows -----------------------------------------------------------------------------


@pytest.mark.slow
def test_shows_each_keys_windows_and_parallel_limit_as_kimi_reports_them(path, kimi):
    pool(path)
    now = time.time()
    kimi.set_usage(K0, five_hour_limit=200, five_hour_used=140, five_hour_reset=now + 2 * 3600 + 5 * 60 + 30,
                   weekly_limit=2048, weekly_used=512, weekly_reset=now + 3 * 86400 + 4 * 3600 + 600,
                   parallel_limit=12)
    kimi.set_usage(K1, five_hour_limit=100, five_hour_used=5, five_hour_reset=now + 4 * 3600 + 59 * 60 + 30,
                   weekly_used=7, parallel_limit=3)
    result = usage(path, kimi)
    assert result.returncode == 0, result.stderr
    first, second = block(result.stdout, 0), block(result.stdout, 1)
    assert first.splitlines() == [
        "[0] Personal (sk-kim…00a0)",
        "   5-hour  ███████░░░  140/200 used, 60 left, resets in 2h 05m",
        "   weekly  ███░░░░░░░  512/2048 used, 1536 left, resets in 3d 4h",
        "   parallel limit: 12 requests at once",
    ]
    assert "5-hour  █░░░░░░░░░  5/100 used, 95 left, resets in 4h 59m" in second
    assert "weekly  ░░░░░░░░░░  7/2048 used, 2041 left" in second
    assert "parallel limit: 3 requests at once" in second
    assert result.stdout.splitlines()[-1] == "Read the quota of 2 keys (saved in the accounts file)."
    asked = [(r.method, r.path, r.headers["authorization"]) for r in kimi.requests]
    assert sorted(asked) == sorted(("GET", USAGES_PATH, f"Bearer {key}") for key in KEYS[:2])


@pytest.mark.slow
def test_a_spent_window_shows_a_full_bar_and_says_spent(path, kimi):
    pool(path, keys=(K0,))
    kimi.set_usage(K0, five_hour_limit=200, five_hour_used=200, five_hour_reset=time.time() + 1800 + 30)
    result = usage(path, kimi)
    assert result.returncode == 0, result.stderr
    assert "   5-hour  ██████████  200/200 used, 0 left (spent), resets in 30m " in result.stdout
    assert "weekly  ░░░░░░░░░░  0/2048 used, 2048 left, resets in" in result.stdout  # not spent


@pytest.mark.slow
def test_an_invalid_key_is_named_and_the_others_still_read(path, kimi):
    pool(path, keys=KEYS)
    # Kimi's answer echoes the key: it must reach the screen masked.
    kimi.set_response(K1, 401, {"error": {"type": "authentication_error",
                                          "message": f"The API key {K1} is invalid"}}, path=USAGES_PATH)
    result = usage(path, kimi)
    assert result.returncode == 1
    assert block(result.stdout, 1).splitlines() == [
        "[1] Work (sk-kim…00b1)",
        "   invalid (Kimi answered 401: The API key sk-kim…00b1 is invalid)",
    ]
    assert "140" not in block(result.stdout, 1)
    for index in (0, 2):
        assert "5-hour  ░░░░░░░░░░  0/200 used, 200 left" in block(result.stdout, index)
    assert result.stdout.splitlines()[-1] == \
        "Could not read 1 of 3 keys: [1]; read 2 (saved in the accounts file)."
    quotas = {a["key"]: a.get("quota") for a in accounts_on_disk(path)}
    assert quotas[K0] and quotas[K2] and quotas[K1] is None


def test_a_network_error_is_shown_and_nothing_is_written(path):
    pool(path)
    before = path.read_bytes(), path.stat().st_mtime_ns
    port = closed_port()
    result = run(path, "usage", "--base-url", f"http://127.0.0.1:{port}/coding")
    assert result.returncode == 1
    said = f"   network error: [Errno 111] Connection refused (asking http://127.0.0.1:{port}/coding/v1/usages)"
    assert said in block(result.stdout, 0)
    assert said in block(result.stdout, 1)
    assert result.stdout.splitlines()[-1] == "Could not read 2 of 2 keys: [0], [1]; read 0."
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_a_network_error_names_the_proxy_it_went_through(path, monkeypatch):
    pool(path, keys=(K0,))
    port = closed_port()
    monkeypatch.setenv("HTTPS_PROXY", f"http://corp:s3cret@127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    result = run(path, "usage", "--base-url", "https://127.0.0.1:9/coding")
    assert ("(asking https://127.0.0.1:9/coding/v1/usages through the proxy "
            f"http://corp:***@127.0.0.1:{port})") in block(result.stdout, 0), result.stdout
    assert "s3cret" not in result.stdout + result.stderr


@pytest.mark.slow
def test_an_answer_that_is_not_a_usages_document_says_so(path, kimi):
    pool(path, keys=(K0,))
    kimi.set_response(K0, 200, "<html>welcome</html>", headers={"content-type": "text/html"}, path=USAGES_PATH)
    before = path.read_bytes()
    result = usage(path, kimi)
    assert result.returncode == 1
    assert "   Kimi's answer is not a usages document (HTTP 200, text/html)" in result.stdout
    assert path.read_bytes() == before


@pytest.mark.slow
def test_a_slow_answer_is_given_up_after_the_timeout(path, kimi, monkeypatch):
    pool(path, keys=(K0,))
    monkeypatch.setattr(usage_verb, "TIMEOUT_S", 0.2)
    kimi.set_response(K0, 200, delay=2.0, path=USAGES_PATH)
    result = usage(path, kimi)
    assert result.returncode == 1
    assert "   no answer within 0.2 s" in result.stdout


@pytest.mark.slow
def test_a_redirect_is_not_followed_so_the_key_goes_nowhere_else(path, kimi):
    pool(path, keys=(K0,))
    with FakeKimi() as elsewhere:
        kimi.set_response(K0, 302, b"", headers={"Location": elsewhere.url + USAGES_PATH}, path=USAGES_PATH)
        result = usage(path, kimi)
        assert elsewhere.requests == []
    assert result.returncode == 1
    assert "Kimi answered 302 (a redirect; not followed" in result.stdout


@pytest.mark.slow
def test_a_key_no_header_can_carry_is_not_sent(path, kimi):
    odd = "sk-kimi-FAKEodd\nSECRETPART0000000000zz"
    storage.write_accounts(path, AccountsFile(accounts=[Account(key=odd, name="Odd"), Account(key=K0)]))
    result = usage(path, kimi)
    assert result.returncode == 1
    assert "   not asked: the key holds spaces or characters an HTTP header can't carry" in result.stdout
    assert "SECRETPART" not in result.stdout + result.stderr
    assert kimi.keys_seen() == [K0]


@pytest.mark.slow
def test_keys_are_asked_at_the_same_time(path, kimi, monkeypatch):
    pool(path, keys=KEYS)
    # Each ask waits until all three are under way: asked one after another, the first
    # would wait alone and the barrier break.
    barrier = threading.Barrier(len(KEYS), timeout=10)
    asking = usage_verb.ask

    def ask_together(*args, **kwargs):
        barrier.wait()
        return asking(*args, **kwargs)

    monkeypatch.setattr(usage_verb, "ask", ask_together)
    result = usage(path, kimi)
    assert result.returncode == 0, result.stdout
    assert [line for line in result.stdout.splitlines() if line.startswith("[")] == [
        "[0] Personal (sk-kim…00a0)", "[1] Work (sk-kim…00b1)", "[2] Spare (sk-kim…00c2)"]


@pytest.mark.slow
def test_index_asks_only_that_key(path, kimi):
    pool(path, keys=KEYS)
    result = usage(path, kimi, "1")
    assert result.returncode == 0, result.stderr
    assert kimi.keys_seen() == [K1]
    assert result.stdout.startswith("[1] Work (sk-kim…00b1)\n")
    assert result.stdout.splitlines()[-1] == "Read the quota of 1 key (saved in the accounts file)."


@pytest.mark.slow
@pytest.mark.parametrize("index, message", [
    ("5", "index 5 out of range (2 keys: 0-1)"),
    ("-1", "index must be a whole number 0 or more, got '-1'"),
    ("one", "index must be a whole number 0 or more, got 'one'"),
])
def test_a_bad_index_is_a_usage_error_and_asks_nothing(path, kimi, index, message):
    pool(path)
    before = path.read_bytes()
    result = usage(path, kimi, index)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and result.stderr.startswith("kimi-rotator: error: ")
    assert kimi.requests == [] and path.read_bytes() == before


@pytest.mark.parametrize("base", ["ftp://api.kimi.com/coding", "api.kimi.com/coding", "http://",
                                  "http://127.0.0.1:port/coding", "http://127.0.0.1:99999/coding"])
def test_a_bad_base_url_is_a_usage_error(path, base):
    pool(path)
    result = run(path, "usage", "--base-url", base)
    assert result.returncode == 2
    assert "--base-url must be an http(s) URL" in result.stderr


@pytest.mark.slow
def test_no_keys_says_how_to_add_one(path, kimi):
    result = usage(path, kimi)
    assert result.returncode == 0
    assert result.stdout.startswith("No Kimi API keys configured.")
    assert kimi.requests == [] and not path.exists()


@pytest.mark.slow
def test_the_base_url_comes_from_kimi_clis_variable_unless_given(path, kimi, monkeypatch):
    pool(path, keys=(K0,))
    monkeypatch.setenv(usage_verb.BASE_URL_ENV, kimi.base_url + "/v1")  # Kimi CLI's form
    assert run(path, "usage").returncode == 0
    monkeypatch.setenv(usage_verb.BASE_URL_ENV, f"http://127.0.0.1:{closed_port()}/coding")
    assert run(path, "usage", "--base-url", kimi.base_url + "/").returncode == 0
    assert [r.path for r in kimi.requests] == [USAGES_PATH, USAGES_PATH]


# -- the JSON document -------------------------------------------------------------------------


@pytest.mark.slow
def test_json_has_masked_keys_windows_parallel_limit_and_errors(path, kimi):
    pool(path)
    reset = int(time.time()) + 3600
    kimi.set_usage(K0, five_hour_limit=200, five_hour_used=20, five_hour_reset=reset,
                   weekly_limit=1000, weekly_used=100, weekly_reset=reset + 86400, parallel_limit=8)
    kimi.set_response(K1, 401, {"error": {"message": "Invalid Authentication"}}, path=USAGES_PATH)
    result = usage(path, kimi, "--json")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["url"] == kimi.base_url + "/v1/usages"
    assert (doc["failed"], doc["saved"]) == (1, True)
    read, invalid = doc["accounts"]
    assert read["takenAt"] > 0
    assert read == {
        "index": 0, "name": "Personal", "maskedKey": "sk-kim…00a0", "takenAt": read["takenAt"],
        "windows": [
            {"name": "5-hour", "minutes": 300, "limit": 200, "used": 20, "remaining": 180,
             "resetTime": reset * 1000, "remainingRatio": 0.9},
            {"name": "weekly", "minutes": 10080, "limit": 1000, "used": 100, "remaining": 900,
             "resetTime": (reset + 86400) * 1000, "remainingRatio": 0.9},
        ],
        "parallelLimit": 8, "httpStatus": 200, "error": None,
    }
    assert invalid == {
        "index": 1, "name": "Work", "maskedKey": "sk-kim…00b1", "takenAt": None, "windows": [],
        "parallelLimit": None, "httpStatus": 401,
        "error": "invalid (Kimi answered 401: Invalid Authentication)",
    }


# -- the reading in the accounts file and in list-keys ---------------------------------------


@pytest.mark.slow
def test_the_reading_lands_in_the_file_and_list_keys_shows_it(path, kimi, monkeypatch):
    pool(path)
    reset = int(time.time()) + 2 * 3600
    kimi.set_usage(K0, five_hour_limit=200, five_hour_used=50, five_hour_reset=reset, parallel_limit=4)
    assert usage(path, kimi, "0").returncode == 0
    saved = {a["key"]: a.get("quota") for a in accounts_on_disk(path)}
    assert saved[K1] is None
    taken = saved[K0]["takenAt"]
    assert saved[K0]["parallelLimit"] == 4
    assert saved[K0]["windows"][0] == {"minutes": 300, "limit": 200, "used": 50, "remaining": 150,
                                       "resetTime": reset * 1000}

    monkeypatch.setattr(cli, "now_ms", lambda: taken + 5 * MIN)
    listed = run(path, "list-keys")
    assert listed.returncode == 0
    personal, work = listed.stdout.split("○ [1] Work")
    lines = personal.splitlines()
    at = lines.index("   Quota (read 5m 0s ago):")
    assert lines[at + 1].startswith("     5-hour  ███░░░░░░░  50/200 used, 150 left, resets in 1h 5")
    assert "     parallel limit: 4 requests at once" in lines[at + 2:]
    assert "Quota" not in work

    doc = json.loads(run(path, "list-keys", "--json").stdout)
    first, second = doc["accounts"]
    assert first["quota"] == {
        "takenAt": taken, "parallelLimit": 4,
        "windows": [{"name": "5-hour", "minutes": 300, "limit": 200, "used": 50, "remaining": 150,
                     "resetTime": reset * 1000, "remainingRatio": 0.75},
                    {"name": "weekly", "minutes": 10080, "limit": 2048, "used": 0, "remaining": 2048,
                     "resetTime": saved[K0]["windows"][1]["resetTime"], "remainingRatio": 1.0}],
    }
    assert "quota" not in second


def test_list_keys_says_when_a_window_has_reset_since_the_reading(path, monkeypatch):
    reading = QuotaReading(taken_at=1_000 * MIN, windows=[
        QuotaWindow(minutes=300, limit=200, used=200, remaining=0, reset_time=1_010 * MIN)])
    pool(path, keys=(K0,), a0={"quota": reading})
    monkeypatch.setattr(cli, "now_ms", lambda: 1_070 * MIN)
    listed = run(path, "list-keys").stdout
    assert "   Quota (read 1h 10m ago):" in listed
    assert "     5-hour  ██████████  200/200 used, 0 left (spent), reset 1h 00m ago (reading out of date)" \
        in listed


@pytest.mark.slow
def test_saving_merges_with_what_others_wrote_meanwhile(path, kimi, monkeypatch):
    newer = QuotaReading(taken_at=int(time.time() * 1000) + 3_600_000, parallel_limit=99)
    pool(path, keys=KEYS, a2={"quota": newer})
    asking = usage_verb.ask
    changed = threading.Event()

    def ask_while_others_write(*args, **kwargs):
        # Once, while the keys are being asked: a proxy counts requests, a person
        # renames a key and removes another.
        if not changed.is_set():
            changed.set()

            def meanwhile(state: AccountsFile) -> AccountsFile:
                state.accounts[0].total_requests += 7
                state.accounts[0].name = "Renamed"
                del state.accounts[1]
                return state

            storage.update_accounts(path, meanwhile)
        return asking(*args, **kwargs)

    monkeypatch.setattr(usage_verb, "ask", ask_while_others_write)
    result = usage(path, kimi)
    assert result.returncode == 0, result.stdout
    on_disk = accounts_on_disk(path)
    assert [(a["key"], a["name"], a["totalRequests"]) for a in on_disk] == [(K0, "Renamed", 7), (K2, "Spare", 0)]
    assert on_disk[0]["quota"]["windows"][0]["limit"] == 200  # ours, where there was none
    assert on_disk[1]["quota"]["parallelLimit"] == 99  # the newer reading kept


# -- through a real HTTPS proxy ----------------------------------------------------------------


@pytest.mark.slow
def test_https_proxy_and_ssl_cert_file_from_the_environment_are_honoured(path, kimi, tmp_path):
    pool(path, keys=(K0,))
    kimi.set_usage(K0, five_hour_limit=300, five_hour_used=123, five_hour_reset=time.time() + 3 * 3600 + 90,
                   parallel_limit=6)
    proxy = start_mitmdump(addons=[LOOPBACK_DNS], options={"loopback_dns_port": kimi.port},
                           confdir=tmp_path / "mitm")
    try:
        base = ["usage", "--base-url", "https://api.kimi.com/coding"]
        through = {"HTTPS_PROXY": proxy.url, "NO_PROXY": "", "no_proxy": ""}
        result = run_cli(path, *base, env={**through, "SSL_CERT_FILE": str(proxy.ca_cert)})
        untrusted = run_cli(path, *base, env={**through, "SSL_CERT_FILE": str(tmp_path / "none.pem"),
                                              "SSL_CERT_DIR": str(tmp_path)})
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stdout + result.stderr + proxy.output()
    assert "   5-hour  ████░░░░░░  123/300 used, 177 left, resets in 3h 01m" in result.stdout
    assert "   parallel limit: 6 requests at once" in result.stdout
    seen = [(r.path, r.headers["host"], r.headers["authorization"]) for r in kimi.requests]
    assert seen == [(USAGES_PATH, "api.kimi.com", f"Bearer {K0}")]  # the second never got through
    assert untrusted.returncode == 1
    assert "TLS error" in untrusted.stdout and "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout
    for text in (result.stdout, result.stderr, untrusted.stdout, untrusted.stderr):
        assert K0 not in text and not _ANY_KEY.search(text)
    assert accounts_on_disk(path)[0]["quota"]["windows"][0]["used"] == 123
