"""What is wrong with how the proxy was started is said in one line naming the option,
and the proxy stops: a `kimi_*` option given twice, one that is not ours, a bad value,
a store URL that is not a URL. Before, a repeated option switched the addon off
without a word, an unknown one was ignored, and a bad value printed tracebacks."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from mitmproxy import exceptions

from rotator.proxy.startup_checks import OptionErrorsInOneLine, deferred_problems, reverse_targets_not_kimi
from rotator.store.urls import masked_url
from testbed.processes import child_env, mitmdump_path
from tests.support.harness import ADDON_SCRIPT
from tests.support.harness import run_cli


class Unparsed:  # what mitmproxy keeps for an option given before its addon loaded
    def __init__(self, *values: str) -> None:
        self.val = list(values)


DEFAULTS = {"kimi_max_wait": "30", "kimi_hosts": ["api.kimi.com"], "kimi_store": ""}


@pytest.mark.parametrize(("deferred", "said"), [
    ({"kimi_max_wait": Unparsed("20", "30")},
     {"kimi_max_wait": "kimi_max_wait is set 2 times ('20', '30'); set it once"}),
    ({"kimi_max_wait": Unparsed("20")}, {}),
    ({"kimi_hosts": Unparsed("a", "b")}, {}),  # a list option takes repeats
    ({"kimi_max_wiat": Unparsed("3")},
     {"kimi_max_wiat": "kimi_max_wiat is not an option of kimi-rotator; did you mean kimi_max_wait?"}),
    ({"kimi_zzz": Unparsed("1")},
     {"kimi_zzz": "kimi_zzz is not an option of kimi-rotator; its options are kimi_hosts, kimi_max_wait, kimi_store"}),
    ({"listen_zzz": Unparsed("1", "2"), "other_addon_opt": Unparsed("x")}, {}),  # not ours to judge
], ids=["repeated", "once", "list-repeated", "typo", "unknown", "not-ours"])
def test_deferred_problems(deferred: dict[str, Unparsed], said: dict[str, str]) -> None:
    assert deferred_problems(deferred, DEFAULTS) == said


def test_the_strategy_option_people_guess_points_at_the_verb() -> None:
    said = deferred_problems({"kimi_strategy": Unparsed("round-robin")}, DEFAULTS)["kimi_strategy"]
    assert "kimi-rotator set-strategy NAME" in said and "kimi.strategy" in said


def test_an_option_error_is_logged_without_its_tracebacks() -> None:
    try:
        try:
            raise ValueError("inner")
        except ValueError as e:
            raise exceptions.OptionsError("kimi_store: not a usable Redis URL") from e
    except exceptions.OptionsError as e:
        record = logging.LogRecord("mitmproxy.addons.script", logging.ERROR, "x", 1,
                                   "error in script %s", ("addon.py",), (type(e), e, e.__traceback__))
    assert OptionErrorsInOneLine().filter(record)
    formatted = logging.Formatter().format(record)
    assert formatted == "kimi-rotator: kimi_store: not a usable Redis URL"


def test_other_errors_keep_their_traceback() -> None:
    try:
        raise RuntimeError("a bug")
    except RuntimeError as e:
        record = logging.LogRecord("mitmproxy.addons.script", logging.ERROR, "x", 1,
                                   "error in script %s", ("addon.py",), (type(e), e, e.__traceback__))
    OptionErrorsInOneLine().filter(record)
    assert "Traceback" in logging.Formatter().format(record)


@pytest.mark.parametrize("url", ["redis://u:secret@[bad/0", "redis://u:secret@host:abc/0"])
def test_a_url_that_does_not_parse_is_masked_whole(url: str) -> None:
    assert masked_url(url) == "redis://***"


# -- through real mitmdump -------------------------------------------------------------

def start_and_stop(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [mitmdump_path(), "--listen-host", "127.0.0.1", "-p", "0", "-q",
            "--set", f"confdir={tmp_path / 'mitm'}", "-s", str(ADDON_SCRIPT),
            "--set", "kimi_status=off", "--set", "kimi_usage_interval=0",
            "--set", f"kimi_accounts={tmp_path / 'accounts.json'}"]
    for spec in sets:
        args += ["--set", spec]
    # -q: only errors; mitmdump exits after start-up when one was logged.
    return subprocess.run(args, capture_output=True, text=True, timeout=30, env=child_env(None))


@pytest.mark.slow
@pytest.mark.parametrize(("sets", "line"), [
    (("kimi_max_wait=20", "kimi_max_wait=30"), "kimi-rotator: kimi_max_wait is set 2 times ('20', '30'); set it once"),
    (("kimi_strategy=round-robin",), "kimi-rotator: kimi_strategy is not an option of kimi-rotator; the rotation "
                                     "strategy is kept with the keys: run kimi-rotator set-strategy NAME "
                                     "(or the kimi.strategy command)"),
    (("kimi_max_wiat=3",), "kimi-rotator: kimi_max_wiat is not an option of kimi-rotator; did you mean kimi_max_wait?"),
    (("kimi_max_wait=abc",), "kimi-rotator: kimi_max_wait: 'abc' is not a number of seconds"),
    (("kimi_store=redis://u:secret@[bad",), "kimi-rotator: kimi_store: redis://***: not a usable Redis URL "
                                            "(Invalid IPv6 URL)"),
], ids=["repeated", "strategy", "typo", "bad-value", "bad-store-url"])
def test_mitmdump_stops_with_one_line(tmp_path: Path, sets: tuple[str, ...], line: str) -> None:
    done = start_and_stop(tmp_path, *sets)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert line in output.splitlines()[0], output
    assert "Traceback" not in output and "secret" not in output, output



def test_the_cli_says_a_store_url_that_does_not_parse_in_one_line(tmp_path: Path) -> None:
    done = run_cli(None, "--store", "redis://u:secret@[bad", "list-keys", in_process=True)
    assert done.returncode == 1
    assert done.stderr.strip() == "kimi-rotator: error: redis://***: not a usable Redis URL (Invalid IPv6 URL)"


@pytest.mark.parametrize(("modes", "hosts", "outside"), [
    (["reverse:https://api.moonshot.ai"], {"api.kimi.com"}, ["api.moonshot.ai"]),
    (["reverse:https://API.Kimi.com."], {"api.kimi.com"}, []),
    (["regular"], {"api.kimi.com"}, []),
    (["reverse:http://127.0.0.1:9000", "reverse:https://x.example@8081"], {"127.0.0.1"}, ["x.example"]),
    (["reverse:not a url at all["], {"api.kimi.com"}, []),  # mitmproxy says what is wrong
])
def test_reverse_targets_not_kimi(modes: list[str], hosts: set[str], outside: list[str]) -> None:
    assert reverse_targets_not_kimi(modes, hosts) == outside


@pytest.mark.slow
def test_a_reverse_target_outside_kimi_hosts_is_said_at_start(fake_kimi, write_accounts, keys, start_proxy) -> None:
    write_accounts(keys)
    told = start_proxy(fake_kimi, options={"kimi_hosts": "api.kimi.com"})
    assert ("kimi-rotator: the reverse target 127.0.0.1 is not one of kimi_hosts (api.kimi.com): its requests "
            "get no pool key and pass as the client sent them. If it is Kimi's, start with "
            "--set kimi_hosts=127.0.0.1") in told.output()
    assert "reverse target" not in start_proxy(fake_kimi).output()  # the harness's own: 127.0.0.1 is a Kimi host
