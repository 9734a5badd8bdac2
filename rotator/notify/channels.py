"""Where notifications go: apprise URLs read from the option and the environment, shown
masked, and one message sent to one URL through apprise.

An apprise URL often carries its secret in plain sight (`tgram://BOT_TOKEN/CHAT`,
`discord://ID/TOKEN`, `json://user:password@host/path`), so a URL is only ever shown as
`mask_url` gives it, and a failure's reason has every part of its URL taken out before
it is shown. apprise's own log lines (which name URLs with their paths) stay inside
apprise: its logger does not pass them on to the proxy's log.
"""

from __future__ import annotations

import importlib.util
import inspect
import ipaddress
import logging
import re
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from rotator.notify.text import ELLIPSIS, clean

NOTIFY_ENV = "KIMI_ROTATOR_NOTIFY"
INSTALL_HINT = "apprise is not installed: pip install 'kimi-rotator[notify]' (or pip install apprise)"
UNUSABLE = "apprise cannot use this URL (an unknown service, or a part of it missing)"
REASON_MOST = 300
APPRISE_LOGGER = "apprise"
QUIET_LOGGERS = ("urllib3", "requests", "requests_oauthlib", "oauthlib")

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
# Where one URL ends and the next begins in a list: a comma or blank before `scheme://`
# (a comma inside a URL, as in `mailto://...?to=a@x.org,b@x.org`, stays in it).
_URL_SEPARATOR = re.compile(r"[\s,]+(?=[A-Za-z][A-Za-z0-9+.\-]*://)")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# What says why a connection failed, in the detail lines apprise logs below WARNING.
_DETAIL = re.compile(
    r"\[Errno -?\d+\] [^\"')\]]+|Read timed out|timed out|certificate verify failed[^\"')]*"
)


class Sender(Protocol):
    """Sends one message to one URL within `timeout_s`: None when it was sent, else why
    not (words, no secrets)."""

    def send(self, url: str, title: str, body: str, timeout_s: float) -> str | None: ...


# -- URLs --------------------------------------------------------------------------------

def parse_urls(values: Sequence[str]) -> list[str]:
    """The URLs in `values` (each one URL or several separated by commas or blanks),
    in order, each once."""
    urls: list[str] = []
    for value in values:
        for url in _URL_SEPARATOR.split(value.strip()):
            url = url.strip().strip(",").strip()
            if url and url not in urls:
                urls.append(url)
    return urls


def notify_urls(option: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The configured URLs: `kimi_notify`'s if it has any, else `$KIMI_ROTATOR_NOTIFY`'s."""
    return parse_urls(option) or parse_urls([environ.get(NOTIFY_ENV, "")])


def _shows_host(host: str) -> bool:
    """A host that names a machine, not a secret: an IP address, localhost, or a dotted
    DNS name ending in letters. A bare word is a token or a topic in many apprise URLs
    (`ntfy://my-secret-topic`, `slack://T000/B000/XXX`, `discord://ID/TOKEN`)."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if host.lower() == "localhost":
        return True
    labels = host.rstrip(".").split(".")
    return (
        len(host) <= 253
        and len(labels) >= 2
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
        and labels[-1].isalpha()
    )


def _authority(url: str) -> tuple[str, str, str] | None:
    """(scheme, host, port) of `url`; None if it is not `scheme://...`."""
    url = url.strip()
    if _SCHEME.match(url) is None:
        return None
    split = urllib.parse.urlsplit(url)
    hostport = split.netloc.rpartition("@")[2]
    if hostport.startswith("["):
        host, _, tail = hostport.partition("]")
        return split.scheme, host + "]", tail[1:] if tail.startswith(":") else ""
    host, _, port = hostport.partition(":")
    return split.scheme, host, port


def mask_url(url: str) -> str:
    """`json://127.0.0.1:8080`, `mailto://gmail.com`, `tgram://…`, `dbus://`: the scheme,
    and the host and port only when the host names a machine; never a user, a password,
    a path or a query, where apprise URLs keep their tokens."""
    parts = _authority(url)
    if parts is None:
        return "(not a URL)"
    scheme, host, port = parts
    if not host:
        return f"{scheme}://"
    if not _shows_host(host):
        return f"{scheme}://{ELLIPSIS}"
    return f"{scheme}://{host}" + (f":{port}" if port.isdigit() else "")


def redact(text: str, url: str) -> str:
    """`text` with `url` and every part of it that may be secret (user, password, a host
    that is not shown, each path segment, each query value) taken out."""
    url = url.strip()
    secrets = {url}
    parts = _authority(url)
    if parts is not None:
        split = urllib.parse.urlsplit(url)
        userinfo, _, hostport = split.netloc.rpartition("@")
        secrets.update(re.split(r"[:@]", userinfo))
        if not _shows_host(parts[1]):
            secrets.update((parts[1], hostport, parts[2]))
        secrets.update(re.split(r"[/;]", split.path))
        secrets.update(re.split(r"[&=,;]", split.query))
        secrets.add(split.fragment)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) < 3:  # "a", "en": taking those out would garble the words
            continue
        for form in {secret, urllib.parse.unquote(secret), urllib.parse.quote(secret, safe="")}:
            text = text.replace(form, ELLIPSIS)
    return text


def apprise_missing() -> str | None:
    """Why nothing can be sent (apprise not installed), or None. Does not import it."""
    return INSTALL_HINT if importlib.util.find_spec("apprise") is None else None


# -- apprise -----------------------------------------------------------------------------

class _ThreadRecords(logging.Handler):
    """apprise's log records, kept per sending thread: with apprise 1.x a send runs in
    the caller's thread (async_mode off), so a thread's records are its send's."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._by_thread: dict[int, list[tuple[int, str]]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        kept = self._by_thread.get(record.thread or 0)
        if kept is not None and len(kept) < 50:
            try:
                kept.append((record.levelno, record.getMessage()))
            except Exception:  # a record that cannot be formatted says nothing useful
                pass

    @contextmanager
    def keep(self) -> Iterator[list[tuple[int, str]]]:
        ident = threading.get_ident()
        kept: list[tuple[int, str]] = []
        self._by_thread[ident] = kept
        try:
            yield kept
        finally:
            self._by_thread.pop(ident, None)


_records = _ThreadRecords()
_install_lock = threading.Lock()


def _own_apprise_log() -> None:
    """apprise logs to `_records` only, at every level, and not to the proxy's log; nor
    do the HTTP libraries under it, whose debug lines name each URL's path (a Telegram
    bot's token is in its path) and, for OAuth services, tokens."""
    with _install_lock:
        log = logging.getLogger(APPRISE_LOGGER)
        if _records in log.handlers:
            return
        log.addHandler(_records)
        log.setLevel(logging.DEBUG)
        log.propagate = False
        for name in QUIET_LOGGERS:
            quiet = logging.getLogger(name)
            quiet.addHandler(logging.NullHandler())  # not logging's last resort either
            quiet.propagate = False


def reason_from(entries: Sequence[tuple[int, str]], url: str) -> str:
    """Why a send failed, from apprise's log entries (level, message): its warnings and
    errors, and the socket error under them; the URL's parts taken out, cleaned."""
    said = list(dict.fromkeys(m.strip() for level, m in entries if level >= logging.WARNING))
    text = "; ".join(m for m in said if m) or "apprise reported a failure without a reason"
    for _, message in entries:
        detail = _DETAIL.search(message)
        if detail and detail.group(0) not in text:
            text += f" ({detail.group(0).strip()})"
            break
    return clean(redact(text, url), REASON_MOST)


def _level(name: object) -> int:
    """A level from apprise's log entries (a name such as "WARNING", or a number)."""
    if isinstance(name, int):
        return name
    level = logging.getLevelName(str(name).upper())
    return level if isinstance(level, int) else logging.DEBUG


class AppriseSender:
    """Sends through apprise, one `Apprise` object per URL, made when first used (the
    first one loads apprise's plugins, which takes a while: in the sending thread;
    bench/README.md)."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._call_timeout: bool | None = None  # apprise >= 2 takes timeout= and log_level=

    def _apprise_for(self, url: str) -> Any | None:
        with self._lock:
            if url in self._objects:
                return self._objects[url]
        _own_apprise_log()  # before the import: apprise logs as it loads
        import apprise  # here, not at the top: the extra may be missing, and it is slow

        if self._call_timeout is None:
            self._call_timeout = "timeout" in inspect.signature(apprise.Apprise.notify).parameters
        made = apprise.Apprise(asset=apprise.AppriseAsset(async_mode=False))
        if not made.add(url):
            made = None
        with self._lock:
            self._objects[url] = made
        return made

    def prepare(self, url: str) -> str | None:
        """Makes `url`'s apprise object ahead of the first message: None if apprise can
        use the URL, else why not."""
        if apprise_missing():
            return INSTALL_HINT
        try:
            return None if self._apprise_for(url) is not None else UNUSABLE
        except Exception as error:
            return clean(redact(f"apprise failed: {type(error).__name__}: {error}", url), REASON_MOST)

    def send(self, url: str, title: str, body: str, timeout_s: float) -> str | None:
        if apprise_missing():
            return INSTALL_HINT
        try:
            made = self._apprise_for(url)
            if made is None:
                return UNUSABLE
            import apprise

            kwargs: dict[str, Any] = {"body": body, "title": title,
                                      "body_format": apprise.NotifyFormat.TEXT}
            if self._call_timeout:
                kwargs.update(timeout=timeout_s, log_level=logging.DEBUG)
            with _records.keep() as kept:
                result = made.notify(**kwargs)
            if result:
                return None
            if getattr(getattr(result, "status", None), "name", "") == "TIMEOUT":
                return f"no answer within {timeout_s:g} s"
            logs = getattr(result, "logs", None)  # apprise >= 2: the call's own log
            if callable(logs):
                kept = [(_level(entry.level), str(entry.message)) for entry in logs()]
            return reason_from(kept, url)
        except Exception as error:  # a plugin's bug must not end the sending thread
            return clean(redact(f"apprise failed: {type(error).__name__}: {error}", url), REASON_MOST)
