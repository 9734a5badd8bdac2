"""The `usage` verb: asking Kimi's /usages for each key's quota, showing it, saving the readings.

Each key is asked directly (no proxy of ours in between), with the key as
`Authorization: Bearer`, at `<base>/v1/usages`: the base is `--base-url`, else
`$KIMI_CODE_BASE_URL` (Kimi CLI's variable; a base ending in `/v1` is taken as is),
else `https://api.kimi.com/coding`. urllib honours HTTPS_PROXY / HTTP_PROXY / NO_PROXY
and `ssl.create_default_context()` honours SSL_CERT_FILE, so a corporate proxy or CA
works as it does for other tools. Redirects are not followed: they would carry the key
elsewhere. Keys are asked concurrently, each with a short timeout.

The readings go into the accounts file through the store's `sync`, i.e. the merge rule
(`merge.Rule.READING`, the newest reading wins) under the file lock, so a proxy's counts
and a person's edits made meanwhile survive and a key removed meanwhile is skipped.
Nothing is written when no key was read. Only masked keys are ever shown: text from
outside (Kimi's error messages, network errors) is cleaned and masked.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rotator import __version__
from rotator.admin import ops
from rotator.cli.render import quota_json, reading_lines
from rotator.core import merge
from rotator.core.keys import mask_key
from rotator.core.keys import label
from rotator.core.models import Account
from rotator.core.quota import QuotaReading, parse_usages
from rotator.core.text import clean_line
from rotator.store import StateStore
from rotator.store.urls import masked_url

DEFAULT_BASE_URL = "https://api.kimi.com/coding"
BASE_URL_ENV = "KIMI_CODE_BASE_URL"
TIMEOUT_S = 10.0
MOST_WORKERS = 8
MOST_BODY = 1 << 20  # a usages answer is a few hundred bytes
MESSAGE_MOST = 200
USER_AGENT = f"kimi-rotator/{__version__}"
# What a header can carry as it is: a hand-edited file's "key" may hold anything, and
# http.client's error for a bad header value quotes it (escaped, so masking would miss it).
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


def arguments(parser: argparse.ArgumentParser, index: Callable[[str], int]) -> None:
    """The verb's arguments; `index` parses INDEX as every verb does."""
    parser.add_argument("index", metavar="INDEX", nargs="?", type=index,
                        help="only the key at INDEX (default: every key)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (keys masked)")
    parser.add_argument("--base-url", metavar="URL",
                        help=f"where to ask (default: ${BASE_URL_ENV}, else {DEFAULT_BASE_URL})")


def run(args: argparse.Namespace, store: StateStore, add_hint: str, now: Callable[[], int],
        out: Callable[[str], None]) -> int:
    """The verb: ask, show, save. 0 when every key asked was read, else 1. Raises
    BaseUrlError or ops.OpError (a bad INDEX) before asking anything."""
    url = usages_url(base_url(args.base_url))
    state = store.read()
    if args.index is not None:
        targets = [(args.index, ops.account_at(state, args.index))]
    else:
        targets = list(enumerate(state.accounts))
    if not targets:
        out(f"No Kimi API keys configured.\nAdd one with: {add_hint}")
        return 0
    results = ask_all(targets, url, now)
    shown_at = now()
    if args.json:
        saved = save(store, results, shown_at)
        out(json.dumps(json_report(results, url, saved), indent=2))
    else:
        out("\n".join(text_report(results, shown_at)))
        saved = save(store, results, shown_at)  # a file that can't be written: said after the readings
        out(last_line(results, saved))
    return 1 if failed(results) else 0


class BaseUrlError(ValueError):
    """The base URL given is not an http(s) URL; the message says so."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What asking for one key gave: a reading, or why there is none."""

    reading: QuotaReading | None = None
    error: str | None = None
    status: int | None = None  # the HTTP status, when Kimi answered


@dataclass(frozen=True, slots=True)
class Asked:
    index: int
    account: Account  # its key is used for the merge only, never shown
    answer: Answer

    @property
    def label(self) -> str:
        return label(self.index, self.account.name, mask_key(self.account.key))


# -- where to ask -----------------------------------------------------------------------


def base_url(explicit: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """`--base-url`, else $KIMI_CODE_BASE_URL, else Kimi's; checked to be http(s)."""
    base = (explicit or environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).strip()
    parts = urllib.parse.urlsplit(base)
    if not _is_http_url(parts):
        where = "--base-url" if explicit else BASE_URL_ENV
        raise BaseUrlError(f"{where} must be an http(s) URL such as {DEFAULT_BASE_URL},"
                           f" got {clean_line(base, 80)!r}")
    if parts.query or parts.fragment:
        raise BaseUrlError(f"the base URL must not have a query or fragment, got {clean_line(base, 80)!r}")
    return base.rstrip("/")


def _is_http_url(parts: urllib.parse.SplitResult) -> bool:
    try:
        parts.port  # raises for a port that is not a number 0-65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def usages_url(base: str) -> str:
    """`<base>/v1/usages`; a base that already ends in `/v1` (as Kimi CLI's often does) gets `/usages`."""
    base = base.rstrip("/")
    return f"{base}/usages" if base.endswith("/v1") else f"{base}/v1/usages"


# -- asking -----------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the 3xx then surfaces as an HTTPError


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(
        urllib.request.ProxyHandler(),  # from the environment, NO_PROXY included
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        _NoRedirect(),
    )


def _shown(text: str, key: str) -> str:
    """Outside text fit to show: the key (in any form it was echoed) masked, one clean line."""
    return clean_line(text.replace(key, mask_key(key)), MESSAGE_MOST)


def _message(body: bytes) -> str:
    """The message in an error answer: its JSON `error.message` / `message`, else its text."""
    text = body.decode("utf-8", "replace")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if isinstance(document, dict):
        error = document.get("error")
        for found in (error.get("message") if isinstance(error, dict) else error, document.get("message")):
            if isinstance(found, str) and found.strip():
                return found
    return text


def _refusal(status: int, body: bytes, key: str) -> str:
    message = _shown(_message(body), key)
    said = f"Kimi answered {status}" + (f": {message}" if message else "")
    if status == 401:
        return f"invalid ({said})"
    if 300 <= status < 400:
        return f"{said} (a redirect; not followed, it would carry the key elsewhere)"
    return said


def _network_error(error: BaseException, key: str, timeout_s: float, url: str) -> str:
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, (TimeoutError, socket.timeout)):
        said = f"no answer within {timeout_s:g} s"
    elif isinstance(reason, ssl.SSLError):
        said = f"TLS error: {_shown(str(reason), key)}"
    else:
        said = f"network error: {_shown(str(reason), key) or type(reason).__name__}"
    return f"{said} (asking {route(url)})"


def route(url: str) -> str:
    """Where a request to `url` goes: the URL, and the proxy from the environment
    (HTTPS_PROXY and the like, NO_PROXY heeded) that carries it, its password masked."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    shown = clean_line(url, 120)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return f"{shown} through the proxy {clean_line(masked_url(proxy), 120)}"
    return shown


def ask(url: str, key: str, now: Callable[[], int], timeout_s: float = TIMEOUT_S) -> Answer:
    """One key's reading from `url`, or why there is none. Never raises for what Kimi or
    the network did."""
    if not _HEADER_SAFE.fullmatch(key):
        return Answer(error="not asked: the key holds spaces or characters an HTTP header can't carry")
    request = urllib.request.Request(url, headers={
        "Authorization": f"Bearer {key}", "Accept": "application/json", "User-Agent": USER_AGENT,
    })
    try:
        with _opener().open(request, timeout=timeout_s) as response:
            body = response.read(MOST_BODY)
            status = response.status
            kind = response.headers.get("content-type", "no content type")
    except urllib.error.HTTPError as e:
        try:
            body = e.read(MOST_BODY)
        except (OSError, http.client.HTTPException):
            body = b""
        return Answer(error=_refusal(e.code, body, key), status=e.code)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
        return Answer(error=_network_error(e, key, timeout_s, url))
    reading = parse_usages(body, now())
    if reading is None:
        return Answer(error=f"Kimi's answer is not a usages document (HTTP {status},"
                            f" {_shown(kind, key)})", status=status)
    return Answer(reading=reading, status=status)


def ask_all(targets: Sequence[tuple[int, Account]], url: str, now: Callable[[], int],
            timeout_s: float | None = None) -> list[Asked]:
    """Every target asked at once (a few at a time), each within `timeout_s` (default
    TIMEOUT_S); the results in the order given."""
    if not targets:
        return []
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    with ThreadPoolExecutor(max_workers=min(MOST_WORKERS, len(targets)),
                            thread_name_prefix="kimi-usages") as pool:
        answers = list(pool.map(lambda t: ask(url, t[1].key, now, timeout_s), targets))
    return [Asked(index, account, answer) for (index, account), answer in zip(targets, answers)]


def save(store: StateStore, results: Sequence[Asked], now: int) -> bool:
    """The readings into the store through the merge rule; False when there were none."""
    change = merge.PoolChange()
    for asked in results:
        if asked.answer.reading is not None:
            change.for_key(asked.account.key).set("quota", asked.answer.reading, now)
    if not change:
        return False
    store.sync(change)
    return True


# -- showing ----------------------------------------------------------------------------


def failed(results: Sequence[Asked]) -> list[Asked]:
    return [asked for asked in results if asked.answer.reading is None]


def key_block(asked: Asked, now: int) -> list[str]:
    """The key's label, then a bar line per window and the parallel limit, or the error."""
    answer = asked.answer
    lines = reading_lines(answer.reading, now) if answer.reading is not None else [str(answer.error)]
    return [asked.label, *(f"   {line}" for line in lines)]


def text_report(results: Sequence[Asked], now: int) -> list[str]:
    lines: list[str] = []
    for asked in results:
        lines += [*key_block(asked, now), ""]
    return lines


def last_line(results: Sequence[Asked], saved: bool) -> str:
    bad = failed(results)
    where = " (saved in the accounts file)" if saved else ""
    if not bad:
        return f"Read the quota of {_keys(len(results))}{where}."
    which = ", ".join(f"[{asked.index}]" for asked in bad)
    read = len(results) - len(bad)
    return (f"Could not read {len(bad)} of {_keys(len(results))}: {which};"
            f" read {read}{where}.")


def _keys(count: int) -> str:
    return "1 key" if count == 1 else f"{count} keys"


def json_report(results: Sequence[Asked], url: str, saved: bool) -> dict[str, object]:
    """`usage --json`: per key its masked key, windows and parallel limit, or its error."""
    accounts = []
    for asked in results:
        reading = asked.answer.reading
        numbers = quota_json(reading) if reading is not None else {"takenAt": None, "windows": [],
                                                                    "parallelLimit": None}
        accounts.append({
            "index": asked.index,
            "name": asked.account.name,
            "maskedKey": mask_key(asked.account.key),
            **numbers,
            "httpStatus": asked.answer.status,
            "error": asked.answer.error,
        })
    return {"url": url, "accounts": accounts, "failed": len(failed(results)), "saved": saved}
