"""The addon's options: registering them, parsing and checking each value once, with a
message that names the option when it is wrong, and warning about a risky listen address."""

from __future__ import annotations

import functools
import getpass
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.utils import human

from rotator.core import access
from rotator.core.quota import DEFAULT_RESERVE_PERCENT
from rotator.core.text import clean_line
from rotator.pool.key_pool import DEFAULT_MAX_IN_FLIGHT
from rotator.proxy.polls import DEFAULT_INTERVAL_S
from rotator.proxy.retry import DEFAULT_MAX_ATTEMPTS
from rotator.store import STORE_ENV
from rotator.store.file import ACCOUNTS_ENV, ACCOUNTS_FILENAME, resolve_accounts_path
from rotator.store.urls import DEFAULT_PREFIX, is_private_url, masked_url

logger = logging.getLogger(__name__)

DEFAULT_KIMI_HOSTS = ("api.kimi.com",)
DEFAULT_MAX_WAIT_S = 30.0
DEFAULT_SLOT_TTL_S = 30
MIN_USAGE_INTERVAL_S = 10.0  # /usages is free, but a poll per key every second is not polite
CLIENT_TOKEN_ENV = "KIMI_ROTATOR_CLIENT_TOKEN"
DEFAULT_AFFINITY_TTL_S = 1800


MEMBER_MOST = 64  # characters of a team member's name (kimi_member)


@dataclass(frozen=True, slots=True)
class Settings:
    """The options as the addon uses them, parsed and checked."""

    hosts: frozenset[str] = frozenset(DEFAULT_KIMI_HOSTS)
    accounts_path: Path = field(default_factory=lambda: resolve_accounts_path(None))
    store: str = ""  # "": the accounts file; else a redis:// or rediss:// URL
    store_prefix: str = DEFAULT_PREFIX
    slot_ttl_ms: int = DEFAULT_SLOT_TTL_S * 1000  # a team store's slot of a dead proxy expires then
    flush_interval_s: float = 1.0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_attempts: int = 0  # 0: automatic
    max_wait_ms: int = int(DEFAULT_MAX_WAIT_S * 1000)
    allow_remote: bool = False
    client_token: str | None = None
    # mitmproxy's stream_large_bodies, in bytes: request bodies over it (or of unknown
    # size) are streamed, and their headers go upstream before the `request` hook runs.
    stream_limit: int | None = None
    usage_interval_s: float = DEFAULT_INTERVAL_S  # 0: no polling of /usages but after a refusal
    quota_reserve_percent: float = DEFAULT_RESERVE_PERCENT
    member: str = ""  # this proxy's name in a team's token counts (kimi_member)
    affinity: bool = True  # keep each conversation on one key (rotator.pool.affinity)
    affinity_ttl_ms: int = DEFAULT_AFFINITY_TTL_S * 1000  # a conversation silent this long is forgotten
    stream_retries: bool = True  # a retried answer streams to the client (rotator.proxy.splice)


def member_name(value: str) -> str:
    """A team member's name as counted: `value` cleaned to one short line, else user@host."""
    name = clean_line(value, MEMBER_MOST).strip()
    if name:
        return name
    try:
        user = getpass.getuser()
    except Exception:  # no user name in the environment or the password database
        user = "user"
    return clean_line(f"{user}@{socket.gethostname()}", MEMBER_MOST)


def read_settings(current: Settings, options: Any, updated: set[str]) -> Settings:
    """`current` with the `updated` options read from `options`; OptionsError names a bad one."""
    changes: dict[str, Any] = {}
    if "kimi_hosts" in updated:
        try:
            changes["hosts"] = parse_hosts(options.kimi_hosts)
        except ValueError as e:
            raise exceptions.OptionsError(f"kimi_hosts: {e}") from e
    if "stream_large_bodies" in updated:
        try:
            changes["stream_limit"] = human.parse_size(options.stream_large_bodies or None)
        except ValueError as e:  # mitmproxy's proxyserver says so too
            raise exceptions.OptionsError(f"stream_large_bodies: {e}") from e
    if "kimi_accounts" in updated:
        changes["accounts_path"] = resolve_accounts_path(options.kimi_accounts or None)
    if "kimi_store" in updated:
        changes["store"] = parse_store(options.kimi_store)
    if "kimi_store_prefix" in updated:
        changes["store_prefix"] = options.kimi_store_prefix or DEFAULT_PREFIX
    if "kimi_slot_ttl" in updated:
        changes["slot_ttl_ms"] = int(parse_seconds("kimi_slot_ttl", options.kimi_slot_ttl, 1, 3600) * 1000)
    if "kimi_flush_interval" in updated:
        changes["flush_interval_s"] = parse_seconds("kimi_flush_interval", options.kimi_flush_interval, 0.05, 3600)
    if "kimi_max_in_flight" in updated:
        if options.kimi_max_in_flight < 1:
            raise exceptions.OptionsError("kimi_max_in_flight must be at least 1")
        changes["max_in_flight"] = options.kimi_max_in_flight
    if "kimi_max_attempts" in updated:
        if options.kimi_max_attempts < 0:
            raise exceptions.OptionsError("kimi_max_attempts must be 0 (automatic) or more")
        changes["max_attempts"] = options.kimi_max_attempts
    if "kimi_member" in updated:
        changes["member"] = member_name(options.kimi_member)
    if "kimi_max_wait" in updated:
        changes["max_wait_ms"] = int(parse_seconds("kimi_max_wait", options.kimi_max_wait, 0, 3600) * 1000)
    if "kimi_usage_interval" in updated:
        seconds = parse_seconds("kimi_usage_interval", options.kimi_usage_interval, 0, 7 * 24 * 3600)
        if 0 < seconds < MIN_USAGE_INTERVAL_S:
            raise exceptions.OptionsError(
                f"kimi_usage_interval must be 0 (off) or at least {MIN_USAGE_INTERVAL_S:g} seconds"
            )
        changes["usage_interval_s"] = seconds
    if "kimi_quota_reserve" in updated:
        changes["quota_reserve_percent"] = parse_number(
            "kimi_quota_reserve", options.kimi_quota_reserve, 0, 100, "percent"
        )
    if "kimi_affinity" in updated:
        changes["affinity"] = bool(options.kimi_affinity)
    if "kimi_stream_retries" in updated:
        changes["stream_retries"] = bool(options.kimi_stream_retries)
    if "kimi_affinity_ttl" in updated:
        changes["affinity_ttl_ms"] = int(
            parse_seconds("kimi_affinity_ttl", options.kimi_affinity_ttl, 1, 7 * 24 * 3600) * 1000
        )
    if "kimi_client_token_file" in updated:
        changes["client_token"] = read_client_token(options.kimi_client_token_file)
    if {"kimi_allow_remote", "proxyauth", "kimi_client_token_file"} & updated:
        token = changes.get("client_token", current.client_token)
        proxy_auth = options.proxyauth if "proxyauth" in options else None
        if options.kimi_allow_remote and not (proxy_auth or token):
            raise exceptions.OptionsError(
                "kimi_allow_remote needs proxyauth or a client token "
                f"(kimi_client_token_file or ${CLIENT_TOKEN_ENV}): otherwise anyone who "
                "can reach the proxy spends your keys"
            )
        changes["allow_remote"] = options.kimi_allow_remote
    return replace(current, **changes)


@functools.lru_cache(maxsize=1024)  # asked for every request; hosts are few
def normalize_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


_HOST_SEPARATORS = re.compile(r"[,\s]+")
_HOST_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def parse_hosts(hosts: Sequence[str]) -> frozenset[str]:
    """The host names in `hosts`; each value may hold several, separated by commas or
    whitespace (`--set kimi_hosts=a,b` gives one value; a host name has no comma)."""
    names = (name for value in hosts for name in _HOST_SEPARATORS.split(value))
    parsed = frozenset(_checked_host(normalize_host(name)) for name in names if name)
    if not parsed:
        raise ValueError("at least one host is needed")
    return parsed


def _checked_host(host: str) -> str:
    """A DNS name or an IP address, as mitmproxy's `request.host` holds it (an IPv6
    address without brackets); anything else would silently match no request."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if _HOST_NAME.fullmatch(bare):
        return bare
    raise ValueError(f"{host!r} is not a host name or IP address (no scheme, port, path or wildcard)")


def parse_seconds(option: str, text: str, least: float, most: float) -> float:
    return parse_number(option, text, least, most, "seconds")


def parse_number(option: str, text: str, least: float, most: float, unit: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise exceptions.OptionsError(f"{option}: {text!r} is not a number of {unit}") from None
    if not least <= number <= most:  # also refuses nan
        raise exceptions.OptionsError(f"{option} must be between {least:g} and {most:g} {unit}")
    return number


def read_client_token(path: str) -> str | None:
    """The client token from its file, else from the environment; None if neither is set."""
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise exceptions.OptionsError(f"kimi_client_token_file: cannot read {path}: {e.strerror}") from e
        if not token:
            raise exceptions.OptionsError(f"kimi_client_token_file: {path} is empty")
        return token
    return os.environ.get(CLIENT_TOKEN_ENV, "").strip() or None


def parse_store(text: str) -> str:
    """kimi_store (else $KIMI_ROTATOR_STORE): "" or a redis:// / rediss:// URL."""
    spec = (text or os.environ.get(STORE_ENV, "")).strip()
    if spec and not spec.startswith(("redis://", "rediss://")):
        raise exceptions.OptionsError(
            f"kimi_store: {masked_url(spec)} is not a redis:// or rediss:// URL (empty: the accounts file)"
        )
    return spec


def warn_if_store_exposed(spec: str) -> None:
    if spec and not is_private_url(spec):
        logger.warning(
            "kimi-rotator: the team store %s is neither TLS (rediss://) nor on this machine: "
            "the keys travel and rest in it unencrypted", masked_url(spec),
        )


def add_options(loader: Any) -> None:
    """Register the addon's options (mitmproxy's `load` hook)."""
    loader.add_option(
        "kimi_store", str, "",
        f"Where the pool lives: empty = the accounts file; redis://[USER:PASSWORD@]HOST[:PORT][/DB] "
        f"or rediss://... = a team's pool on Redis. Default: ${STORE_ENV}.",
    )
    loader.add_option(
        "kimi_store_prefix", str, DEFAULT_PREFIX,
        "Prefix of the pool's Redis keys, so several pools can share one server.",
    )
    loader.add_option(
        "kimi_slot_ttl", str, f"{DEFAULT_SLOT_TTL_S}",
        "Team store: seconds after which the in-flight slots of a proxy that stopped "
        "refreshing them (killed, or its machine lost) free up.",
    )
    loader.add_option(
        "kimi_accounts", str, "",
        f"Accounts file. Default: ${ACCOUNTS_ENV}, else the user config folder's "
        f"kimi-rotator/{ACCOUNTS_FILENAME}.",
    )
    loader.add_option(
        "kimi_hosts", Sequence[str], list(DEFAULT_KIMI_HOSTS),
        "Hosts that get pool keys (exact names, case-insensitive; separate several with commas "
        "or repeat the option). Others pass untouched.",
    )
    loader.add_option(
        # Seconds as text: mitmproxy's --set cannot parse float options.
        "kimi_flush_interval", str, "1.0",
        "Seconds between saves of the pool's state (and checks for changes by the CLI).",
    )
    loader.add_option(
        "kimi_member", str, "",
        "This proxy's name in a team's token counts (`stats --by-member`). Default: user@host.",
    )
    loader.add_option(
        "kimi_max_in_flight", int, DEFAULT_MAX_IN_FLIGHT,
        "Requests one key may have in flight at once; a key at its cap is not chosen.",
    )
    loader.add_option(
        "kimi_max_attempts", int, 0,
        f"Attempts per request, each on another key, before the client gets the error. "
        f"0: every key once plus one after waiting for a key, at most {DEFAULT_MAX_ATTEMPTS}.",
    )
    loader.add_option(
        "kimi_max_wait", str, f"{DEFAULT_MAX_WAIT_S:g}",
        "Seconds a request may wait for a cooling or busy key (retries included) before it is answered 429.",
    )
    loader.add_option(
        "kimi_usage_interval", str, f"{DEFAULT_INTERVAL_S:g}",
        "Seconds between polls of Kimi's /usages (each key's quota) for keys used since their "
        "last reading; every enabled key is polled once at start. 0: off (a window refusal still asks).",
    )
    loader.add_option(
        "kimi_quota_reserve", str, f"{DEFAULT_RESERVE_PERCENT:g}",
        "A key whose quota window has at most this percent of its limit left is rested until "
        "the window resets, before Kimi refuses it.",
    )
    loader.add_option(
        "kimi_affinity", bool, True,
        "Keep each conversation (Claude Code's, OpenCode's, Kimi CLI's session id) on one key while "
        "it can serve, and spread new conversations over the keys. Off: every request follows the strategy.",
    )
    loader.add_option(
        "kimi_stream_retries", bool, True,
        "A request retried on another key after a refusal gets that key's answer event by event, "
        "as it comes. Off: the retried answer arrives whole, once Kimi has finished it.",
    )
    loader.add_option(
        "kimi_affinity_ttl", str, f"{DEFAULT_AFFINITY_TTL_S}",
        "Seconds of silence after which a conversation is forgotten (its next turn is new).",
    )
    loader.add_option(
        "kimi_allow_remote", bool, False,
        "Serve clients that are not on this machine. Needs proxyauth or a client token.",
    )
    loader.add_option(
        "kimi_client_token_file", str, "",
        f"File holding a token every client must send as its key (or set ${CLIENT_TOKEN_ENV}).",
    )


def warn_if_listening_beyond_loopback(allow_remote: bool) -> None:
    proxyserver = ctx.master.addons.get("proxyserver")
    addresses = proxyserver.listen_addrs() if proxyserver else []
    exposed = [a for a in addresses if not access.is_loopback_address(a)]
    if exposed:
        where = ", ".join(f"{a[0]}:{a[1]}" for a in exposed)
        if allow_remote:
            logger.warning("kimi-rotator: listening on %s; remote clients may use the pool", where)
        else:
            logger.warning(
                "kimi-rotator: listening on %s, beyond this machine; only local clients get keys, "
                "others get 403. Use --listen-host 127.0.0.1 to stay local.", where,
            )
