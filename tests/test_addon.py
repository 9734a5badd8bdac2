"""The addon in-process, with mitmproxy's test helpers: header handling and options."""

import json

import pytest
from mitmproxy import exceptions
from mitmproxy.http import Headers
from mitmproxy.test import tflow, tutils

from rotator.core.models import Account, AccountsFile
from rotator.proxy.headers import mask_sent_key, replace_client_key
from rotator.proxy.options import parse_hosts
from rotator.store import file as storage
from testbed.hooks import call_hook
from testbed.processes import REPO_ROOT
from tests.support.accounts import fake_key
from tests.support.in_process import addon_in_taddons, configure_with_keys

POOL_KEY = fake_key("pool0")


@pytest.mark.parametrize(
    "client_headers, expected",
    [
        ({"x-api-key": "placeholder"}, {"x-api-key": POOL_KEY}),
        ({"Authorization": "Bearer placeholder"}, {"authorization": f"Bearer {POOL_KEY}"}),
        ({"Authorization": "bearer placeholder"}, {"authorization": f"Bearer {POOL_KEY}"}),
        ({}, {"x-api-key": POOL_KEY}),
        # Both sent: one key goes where Kimi reads it, the other header is dropped.
        ({"x-api-key": "a", "Authorization": "Bearer b"}, {"x-api-key": POOL_KEY}),
        # Basic auth (proxy auth in reverse mode) is not the client's Kimi key: kept.
        (
            {"Authorization": "Basic dXNlcjpwYXNz"},
            {"authorization": "Basic dXNlcjpwYXNz", "x-api-key": POOL_KEY},
        ),
    ],
)
def test_the_pool_key_goes_where_the_client_put_its_own(client_headers, expected):
    headers = Headers(**{"user-agent": "claude-cli/1.0", "x-msh-platform": "x"})
    for name, value in client_headers.items():
        headers[name] = value
    placement = replace_client_key(headers, POOL_KEY)
    credentials = {k.lower(): v for k, v in headers.items() if k.lower() in ("x-api-key", "authorization")}
    assert credentials == expected
    assert headers["user-agent"] == "claude-cli/1.0" and headers["x-msh-platform"] == "x"
    mask_sent_key(headers, POOL_KEY, placement)
    assert POOL_KEY not in str(headers.fields)
    assert f"{POOL_KEY[:6]}...{POOL_KEY[-4:]}" in headers[placement.name.decode()]  # ASCII: headers may be shown raw


def test_masking_finds_the_key_even_if_another_addon_moved_it():
    headers = Headers(**{"x-api-key": "placeholder"})
    placement = replace_client_key(headers, POOL_KEY)
    headers.insert(0, "x-other", "1")
    headers["x-copied"] = POOL_KEY
    mask_sent_key(headers, POOL_KEY, placement)
    assert POOL_KEY.encode() not in b"".join(v for _, v in headers.fields)
    assert headers["x-api-key"] == headers["x-copied"] == f"{POOL_KEY[:6]}...{POOL_KEY[-4:]}"


_POOL = POOL_KEY.encode()


@pytest.mark.parametrize(
    "fields, bearer, expected",
    [
        # Duplicates: the first keeps the key, the others go.
        ([(b"x-api-key", b"a"), (b"X-Api-Key", b"b")], False, [(b"x-api-key", _POOL)]),
        ([(b"Authorization", b"Bearer a"), (b"authorization", b"bearer b")], False,
         [(b"Authorization", b"Bearer " + _POOL)]),
        # The Bearer header dropped before the key's place moves the place back.
        ([(b"Authorization", b"Bearer a"), (b"x-a", b"1"), (b"x-api-key", b"b")], False,
         [(b"x-a", b"1"), (b"x-api-key", _POOL)]),
        ([(b"Authorization", b"Basic x"), (b"x-api-key", b"a"), (b"x-api-key", b"b")], False,
         [(b"Authorization", b"Basic x"), (b"x-api-key", _POOL)]),
        # Bearer forced (our quota polls): x-api-key goes, Bearer is written or added.
        ([(b"x-api-key", b"a"), (b"x-a", b"1")], True, [(b"x-a", b"1"), (b"authorization", b"Bearer " + _POOL)]),
        ([(b"x-api-key", b"a"), (b"Authorization", b"Bearer b")], True, [(b"Authorization", b"Bearer " + _POOL)]),
        ([(b"x-a", b"1")], True, [(b"x-a", b"1"), (b"authorization", b"Bearer " + _POOL)]),
    ],
)
def test_duplicate_and_forced_credentials_leave_one_key_whose_place_is_known(fields, bearer, expected):
    headers = Headers(fields)
    placement = replace_client_key(headers, POOL_KEY, bearer=bearer)
    assert list(headers.fields) == expected
    at = next(i for i, (_, value) in enumerate(expected) if _POOL in value)
    assert placement.index == at and placement.name == expected[at][0].lower()
    mask_sent_key(headers, POOL_KEY, placement)
    masked = f"{POOL_KEY[:6]}...{POOL_KEY[-4:]}".encode()
    assert [value for _, value in headers.fields] == [value.replace(_POOL, masked) for _, value in expected]


@pytest.mark.parametrize("hosts", [[], ["https://api.kimi.com"], ["api.kimi.com/coding"], ["api.kimi.com:443"],
                                   ["127.0.0.1;api.kimi.com"], ["a|b"], ['"api.kimi.com"'], ["*.kimi.com"],
                                   ["['a','b']"], ["a\u3001b"], ["-bad-.kimi.com"]])
def test_bad_host_lists_are_refused(hosts):
    with pytest.raises(ValueError, match="not a host name or IP address|at least one host"):
        parse_hosts(hosts)


def test_ip_addresses_are_hosts_as_mitmproxy_holds_them():
    assert parse_hosts(["[::1]", "127.0.0.1", "::FFFF:7f00:1"]) == {"::1", "127.0.0.1", "::ffff:7f00:1"}


def test_hosts_are_normalised():
    assert parse_hosts(["API.Kimi.com.", " api.moonshot.ai "]) == {"api.kimi.com", "api.moonshot.ai"}


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("kimi_hosts", ["https://api.kimi.com"], "kimi_hosts"),
        ("kimi_flush_interval", "0", "kimi_flush_interval"),
        ("kimi_flush_interval", "soon", "kimi_flush_interval"),
        ("kimi_flush_interval", "nan", "kimi_flush_interval"),
        ("kimi_max_in_flight", 0, "kimi_max_in_flight"),
        ("kimi_max_attempts", -1, "kimi_max_attempts"),
        ("kimi_max_wait", "-1", "kimi_max_wait"),
        ("kimi_max_wait", "soon", "kimi_max_wait"),
        ("kimi_allow_remote", True, "kimi_allow_remote needs proxyauth"),
        ("kimi_client_token_file", "/nonexistent/token", "kimi_client_token_file"),
    ],
)
def test_bad_options_stop_the_proxy_with_a_message(tmp_path, option, value, message):
    with addon_in_taddons() as (addon, tctx):
        with pytest.raises(exceptions.OptionsError, match=message):
            tctx.configure(addon, kimi_accounts=str(tmp_path / "a.json"), **{option: value})


def kimi_flow(host="api.kimi.com", **headers):
    request = tutils.treq(host=host, port=443, path=b"/coding/v1/messages", headers=Headers(**headers))
    request.scheme = "https"
    flow = tflow.tflow(req=request)
    flow.client_conn.peername = ("127.0.0.1", 40000)
    return flow


async def test_no_keys_answers_with_an_anthropic_error(tmp_path):
    with addon_in_taddons() as (addon, tctx):
        configure_with_keys(tctx, addon, tmp_path, [])
        flow = kimi_flow(**{"x-api-key": "placeholder"})
        await call_hook(addon, "request", flow)
        body = json.loads(flow.response.content)
        assert flow.response.status_code == 503
        # The command names the file this proxy reads, not the default one (issue 27).
        assert body["type"] == "error" and f"kimi-rotator --accounts {tmp_path / 'accounts.json'} add-key" in body["error"]["message"]


async def test_unreadable_accounts_file_is_explained_to_the_client(tmp_path):
    path = tmp_path / "accounts.json"
    path.write_text("{broken")
    with addon_in_taddons() as (addon, tctx):
        tctx.configure(addon, kimi_accounts=str(path))
        flow = kimi_flow()
        await call_hook(addon, "request", flow)
        message = json.loads(flow.response.content)["error"]["message"]
        assert str(path) in message and "not valid JSON" in message
    assert path.read_text() == "{broken"


async def test_key_injected_then_masked_once_the_response_arrives(tmp_path):
    with addon_in_taddons() as (addon, tctx):
        configure_with_keys(tctx, addon, tmp_path, [POOL_KEY])
        flow = kimi_flow(**{"x-api-key": "placeholder"})
        await call_hook(addon, "request", flow)
        assert flow.request.headers["x-api-key"] == POOL_KEY
        flow.response = tutils.tresp(status_code=200, content=b"{}")
        addon.responseheaders(flow)
        assert flow.request.headers["x-api-key"] == "sk-kim..." + POOL_KEY[-4:]
        await call_hook(addon, "response", flow)
        attempts = flow.metadata["kimi_rotator"]["attempts"]
        assert attempts == [
            {"account": "", "index": 0, "key": "sk-kim…" + POOL_KEY[-4:], "outcome": "success", "reason": "ok"}
        ]
        assert addon.pool.accounts[0].successful_requests == 1


async def test_other_hosts_are_left_alone(tmp_path):
    with addon_in_taddons() as (addon, tctx):
        configure_with_keys(tctx, addon, tmp_path, [POOL_KEY])
        for host in ("api.kimi.com.evil.test", "evilapi.kimi.com", "kimi.com", "api-kimi.com"):
            flow = kimi_flow(host=host, **{"x-api-key": "mine"})
            await call_hook(addon, "request", flow)
            assert flow.request.headers["x-api-key"] == "mine" and flow.response is None
        assert addon.pool.accounts[0].total_requests == 0


async def test_plain_http_to_a_remote_kimi_host_is_upgraded_to_https(tmp_path):
    with addon_in_taddons() as (addon, tctx):
        configure_with_keys(tctx, addon, tmp_path, [POOL_KEY], kimi_hosts=["api.kimi.com", "127.0.0.1"])
        remote = kimi_flow()
        remote.request.scheme, remote.request.port = "http", 80
        await call_hook(addon, "request", remote)
        assert (remote.request.scheme, remote.request.port) == ("https", 443)
        assert remote.request.headers["x-api-key"] == POOL_KEY
        local = kimi_flow(host="127.0.0.1")
        local.request.scheme, local.request.port = "http", 8000
        await call_hook(addon, "request", local)
        assert (local.request.scheme, local.request.port) == ("http", 8000)


FREEZE_PROBE = """
import asyncio, gc, sys
from mitmproxy.test import taddons
from rotator.proxy.addon import KimiRotator
from testbed.hooks import call_hook
from testbed.processes import REPO_ROOT

async def main():
    start = gc.get_freeze_count()
    addon = KimiRotator()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, kimi_accounts=sys.argv[1], kimi_status="off", kimi_usage_interval="0")
        made_before = [addon]
        await call_hook(addon, "running")
        made_after = [addon]
        frozen = gc.get_freeze_count() - start
        walked = gc.get_objects()
        print(frozen, any(o is made_before for o in walked), any(o is made_after for o in walked))
        await call_hook(addon, "done")
        again = KimiRotator()  # a reload: nothing frozen again
        with taddons.context(again) as tctx2:
            tctx2.configure(again, kimi_accounts=sys.argv[1], kimi_status="off", kimi_usage_interval="0")
            count = gc.get_freeze_count()
            await call_hook(again, "running")
            print(gc.get_freeze_count() == count)
            await call_hook(again, "done")

asyncio.run(main())
"""


@pytest.mark.slow
def test_what_exists_when_the_proxy_starts_is_kept_out_of_the_collectors_walks(tmp_path):
    """The collector walks every object it tracks in each full collection; what lives as
    long as the proxy (modules, classes, the addon's state) is frozen when it first runs,
    so a collection walks only what requests made (bench/instructions.py: ~100k
    instructions a request). In a process of its own: freezing happens once a process."""
    import subprocess
    import sys

    path = tmp_path / "kimi-accounts.json"
    storage.write_accounts(path, AccountsFile(accounts=[Account(key=POOL_KEY)]))
    probe = subprocess.run([sys.executable, "-c", FREEZE_PROBE, str(path)], capture_output=True, text=True,
                           timeout=60, cwd=str(REPO_ROOT))
    assert probe.returncode == 0, probe.stderr
    frozen, before_walked, after_walked, second_froze_nothing = probe.stdout.split()
    assert int(frozen) > 10_000  # mitmproxy's and the addon's modules, at least
    assert before_walked == "False" and after_walked == "True"
    assert second_froze_nothing == "True"
