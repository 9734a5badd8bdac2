"""What the proxy says and does once as it starts: what is wrong with how it was started,
each said in one line that names the option (a `kimi_*` option given twice or not ours,
and a bad value's message without mitmproxy's traceback); which keys it serves
(`announce_keys`); and freezing what lives as long as the process (`freeze_what_lives_on`).

mitmproxy keeps `--set` values for options no addon has registered yet in
`options.deferred` and applies them once a script registers them. A repeated one then
fails inside the script's loading, where mitmproxy 11 and 12 drop the error: the addon
is silently not loaded and the client's placeholder goes upstream. An unknown one stays
deferred forever, unsaid. `check_deferred` runs in the addon's `load`, before that.
"""

from __future__ import annotations

import difflib
import gc
import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from mitmproxy import exceptions
from mitmproxy.log import ALERT
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from rotator.core.models import AccountsFile
from rotator.store import StateStore, cli_command

logger = logging.getLogger(__name__)

PREFIX = "kimi_"
# mitmproxy logs an error raised while loading or configuring a script here.
SCRIPT_LOGGER = "mitmproxy.addons.script"
_STRATEGY_HINT = (
    "the rotation strategy is kept with the keys: run kimi-rotator set-strategy NAME "
    "(or the kimi.strategy command)"
)


def deferred_problems(deferred: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, str]:
    """{option: what is wrong} for the `kimi_*` options in mitmproxy's `deferred`, given
    our options' defaults (a list default takes repeats)."""
    problems: dict[str, str] = {}
    for name, value in deferred.items():
        if not name.startswith(PREFIX):
            continue  # another addon's option, or one loaded after us
        if name not in defaults:
            problems[name] = f"{name} is not an option of kimi-rotator; {_nearest(name, defaults)}"
            continue
        given = getattr(value, "val", None)  # the strings of each --set, not yet parsed
        if isinstance(given, list) and len(given) > 1 and not isinstance(defaults[name], (list, tuple)):
            values = ", ".join(repr(v) for v in given)
            problems[name] = f"{name} is set {len(given)} times ({values}); set it once"
    return problems


def _nearest(name: str, defaults: Mapping[str, Any]) -> str:
    if "strateg" in name:
        return _STRATEGY_HINT
    close = difflib.get_close_matches(name, list(defaults), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return "its options are " + ", ".join(sorted(defaults))


def check_deferred(options: Any) -> None:
    """Say each problem with a `kimi_*` option given before the addon loaded, as an error
    (mitmproxy stops at an error logged while starting), and drop the option so the
    rest of loading goes on and the message is the one the person sees."""
    defaults = {name: options.default(name) for name in options.keys() if name.startswith(PREFIX)}
    for name, problem in deferred_problems(options.deferred, defaults).items():
        options.deferred.pop(name, None)
        logger.error("kimi-rotator: %s", problem)


def reverse_targets_not_kimi(modes: Sequence[str], hosts: Collection[str]) -> list[str]:
    """The hosts of reverse modes that are not among the Kimi hosts: their requests get
    no pool key (keys go only to kimi_hosts), which a person rarely means."""
    outside = []
    for spec in modes:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue  # mitmproxy itself says what is wrong with it
        if isinstance(mode, ReverseMode):
            host = mode.address[0].lower().rstrip(".")
            if host not in hosts and host not in outside:
                outside.append(host)
    return outside


def warn_of_reverse_targets_not_kimi(modes: Sequence[str], hosts: Collection[str]) -> None:
    for host in reverse_targets_not_kimi(modes, hosts):
        logger.warning(
            "kimi-rotator: the reverse target %s is not one of kimi_hosts (%s): its requests get no "
            "pool key and pass as the client sent them. If it is Kimi's, start with --set kimi_hosts=%s",
            host, ", ".join(sorted(hosts)) or "none", host,
        )


class OptionErrorsInOneLine(logging.Filter):
    """An `OptionsError` is a message for a person: mitmproxy logs one raised by a
    script's `configure` with its traceback (two, when it was raised from another
    exception); this keeps the message and drops the tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], exceptions.OptionsError):
            record.msg, record.args = "kimi-rotator: %s", (record.exc_info[1],)
            record.exc_info = None
            record.exc_text = None
        return True


_ONE_LINE = OptionErrorsInOneLine()


def install_one_line_option_errors() -> None:
    """Once per process, however often the script is (re)loaded."""
    script_logger = logging.getLogger(SCRIPT_LOGGER)
    if _ONE_LINE not in script_logger.filters:
        script_logger.addFilter(_ONE_LINE)


_frozen = False


def freeze_what_lives_on() -> None:
    """Once per process, when the proxy first runs: what exists then (modules, classes,
    mitmproxy's and this addon's state) lives until it stops, so it goes out of the
    garbage collector's sight (`gc.freeze`) and each collection walks only what requests
    made since. Walking this addon's imports (pydantic, redis, …) at every full
    collection cost instructions on every request (figures: bench/README.md). Never
    thawed: an addon reloaded later is collected as usual."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.freeze()


def announce_keys(state: AccountsFile, store: StateStore) -> None:
    location = store.location
    if not state.accounts:
        logger.warning("kimi-rotator: no Kimi API keys in %s; add one with: %s", location,
                       cli_command(store, "add-key sk-kimi-…"))
    else:
        logger.log(
            ALERT, "kimi-rotator: %d key(s) from %s, strategy %s",
            len(state.accounts), location, state.rotation_strategy,
        )
