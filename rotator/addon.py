"""The mitmproxy addon: puts a pool key on each Kimi request and learns from each answer.

Deciding lives elsewhere (rotator.strategies picks keys, rotator.policy reads
responses, rotator.pool keeps the state); this module wires those to flows and keeps
the accounts file in step from a background task, never from a hook.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.log import ALERT

from rotator import access, policy, storage
from rotator.keys import mask_key
from rotator.models import AccountsFile
from rotator.pool import DEFAULT_MAX_IN_FLIGHT, KeyPool, Lease
from rotator.responses import anthropic_error
from rotator.strategies import Shortage, Unavailable

logger = logging.getLogger(__name__)

DEFAULT_KIMI_HOSTS = ("api.kimi.com",)
METADATA_KEY = "kimi_rotator"
CLIENT_TOKEN_ENV = "KIMI_ROTATOR_CLIENT_TOKEN"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def normalize_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def parse_hosts(hosts: Sequence[str]) -> frozenset[str]:
    parsed = frozenset(normalize_host(h) for h in hosts if h.strip())
    for host in parsed:
        if "/" in host or ":" in host and not host.startswith("["):
            raise ValueError(f"{host!r} is not a host name (no scheme, port or path)")
    if not parsed:
        raise ValueError("at least one host is needed")
    return parsed


def replace_client_key(headers: http.Headers, key: str) -> None:
    """Put `key` where the client put its own, and nowhere else.

    Bearer clients get a Bearer header; everyone else gets x-api-key. Another kind of
    Authorization (say Basic, for proxy auth in reverse mode) is left alone.
    """
    bearer = headers.get("authorization", "").lower().startswith("bearer ")
    if bearer and "x-api-key" not in headers:
        headers["authorization"] = f"Bearer {key}"
    else:
        headers["x-api-key"] = key
        if bearer:
            del headers["authorization"]


def mask_sent_key(headers: http.Headers, key: str) -> None:
    """Replace the pool key in a request that has gone upstream with its masked form."""
    masked = mask_key(key)
    for name in ("x-api-key", "authorization"):
        value = headers.get(name)
        if value and key in value:
            headers[name] = value.replace(key, masked)


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


class KimiRotator:
    def __init__(self) -> None:
        self.hosts: frozenset[str] = frozenset(DEFAULT_KIMI_HOSTS)
        self.path: Path | None = None
        self.pool = KeyPool(AccountsFile())
        self.file_problem: str | None = None
        self.client_token: str | None = None
        self._signature: storage.FileSignature | None = None
        self._flush_task: asyncio.Task[None] | None = None
        # Leases by flow id; kept off flow.metadata because that is saved with the flow.
        self._leases: dict[str, Lease] = {}

    def load(self, loader: Any) -> None:
        loader.add_option(
            "kimi_accounts", str, "",
            f"Accounts file. Default: ${storage.ACCOUNTS_ENV}, else the user config folder's "
            f"kimi-rotator/{storage.ACCOUNTS_FILENAME}.",
        )
        loader.add_option(
            "kimi_hosts", Sequence[str], list(DEFAULT_KIMI_HOSTS),
            "Hosts that get pool keys (exact names, case-insensitive). Others pass untouched.",
        )
        loader.add_option(
            "kimi_flush_interval", float, 1.0,
            "Seconds between saves of the pool's state (and checks for changes by the CLI).",
        )
        loader.add_option(
            "kimi_max_in_flight", int, DEFAULT_MAX_IN_FLIGHT,
            "Requests one key may have in flight at once; a key at its cap is not chosen.",
        )
        loader.add_option(
            "kimi_allow_remote", bool, False,
            "Serve clients that are not on this machine. Needs proxyauth or a client token.",
        )
        loader.add_option(
            "kimi_client_token_file", str, "",
            f"File holding a token every client must send as its key (or set ${CLIENT_TOKEN_ENV}).",
        )

    def configure(self, updated: set[str]) -> None:
        if "kimi_hosts" in updated:
            try:
                self.hosts = parse_hosts(ctx.options.kimi_hosts)
            except ValueError as e:
                raise exceptions.OptionsError(f"kimi_hosts: {e}") from e
        if "kimi_flush_interval" in updated and not 0.05 <= ctx.options.kimi_flush_interval <= 3600:
            raise exceptions.OptionsError("kimi_flush_interval must be between 0.05 and 3600 seconds")
        if "kimi_max_in_flight" in updated:
            if ctx.options.kimi_max_in_flight < 1:
                raise exceptions.OptionsError("kimi_max_in_flight must be at least 1")
            self.pool.max_in_flight = ctx.options.kimi_max_in_flight
        if "kimi_client_token_file" in updated:
            self.client_token = read_client_token(ctx.options.kimi_client_token_file)
        if {"kimi_allow_remote", "proxyauth", "kimi_client_token_file"} & updated:
            if ctx.options.kimi_allow_remote and not (ctx.options.proxyauth or self.client_token):
                raise exceptions.OptionsError(
                    "kimi_allow_remote needs proxyauth or a client token "
                    f"(kimi_client_token_file or ${CLIENT_TOKEN_ENV}): otherwise anyone who "
                    "can reach the proxy spends your keys"
                )
        if "kimi_accounts" in updated:
            self._load_accounts(storage.resolve_accounts_path(ctx.options.kimi_accounts or None))

    def _load_accounts(self, path: Path) -> None:
        # Runs at start-up and on option changes only, never per request.
        self.path = path
        try:
            state = storage.read_accounts(path)
            self._signature = storage.file_signature(path)
        except storage.AccountsFileError as e:
            self._note_file_problem(e)
            self.pool = KeyPool(AccountsFile(), self.pool.max_in_flight)
            return
        self.file_problem = None
        self.pool = KeyPool(state, self.pool.max_in_flight)
        count = len(state.accounts)
        if count == 0:
            logger.warning(
                "kimi-rotator: no Kimi API keys in %s; add one with: kimi-rotator add-key sk-kimi-…", path
            )
        else:
            logger.log(ALERT, "kimi-rotator: %d key(s) from %s, strategy %s", count, path, state.rotation_strategy)

    # -- lifecycle ---------------------------------------------------------------
    def running(self) -> None:
        self._warn_if_listening_beyond_loopback()
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_forever())

    def done(self) -> None:
        if self._flush_task is not None:
            self._flush_task.cancel()
            self._flush_task = None
        # Shutting down: a last synchronous save is what keeps the counts exact.
        self._flush_now()

    def _warn_if_listening_beyond_loopback(self) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        addresses = proxyserver.listen_addrs() if proxyserver else []
        exposed = [a for a in addresses if not access.is_loopback_address(a)]
        if exposed:
            where = ", ".join(f"{a[0]}:{a[1]}" for a in exposed)
            if ctx.options.kimi_allow_remote:
                logger.warning("kimi-rotator: listening on %s; remote clients may use the pool", where)
            else:
                logger.warning(
                    "kimi-rotator: listening on %s, beyond this machine; only local clients get keys, "
                    "others get 403. Use --listen-host 127.0.0.1 to stay local.", where,
                )

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(ctx.options.kimi_flush_interval)
            try:
                await self._flush()
            except Exception:  # never let a bad save stop future saves
                logger.exception("kimi-rotator: saving the accounts file failed")

    async def _flush(self) -> None:
        if self.path is None:
            return
        taken, base_active_key = self.pool.take_pending()
        try:
            result = await asyncio.to_thread(self._sync, self.path, taken, base_active_key, self._signature)
        except storage.AccountsFileError as e:
            self.pool.give_back(taken)
            self._note_file_problem(e)
            return
        self._adopt(result)

    def _flush_now(self) -> None:
        if self.path is None:
            return
        taken, base_active_key = self.pool.take_pending()
        try:
            result = self._sync(self.path, taken, base_active_key, self._signature)
        except storage.AccountsFileError as e:
            self.pool.give_back(taken)
            self._note_file_problem(e)
            return
        self._adopt(result)

    @staticmethod
    def _sync(
        path: Path,
        taken: Any,
        base_active_key: str | None,
        known: storage.FileSignature | None,
    ) -> tuple[AccountsFile, storage.FileSignature | None] | None:
        """Runs in a worker thread: merge our changes into the file, or notice the CLI's."""
        from rotator.pool import apply_pending

        if not taken and storage.file_signature(path) == known:
            return None
        state = storage.update_accounts(
            path, lambda disk: apply_pending(disk, taken, base_active_key) if taken else None
        )
        return state, storage.file_signature(path)

    def _adopt(self, result: tuple[AccountsFile, storage.FileSignature | None] | None) -> None:
        if self.file_problem is not None:
            logger.log(ALERT, "kimi-rotator: %s is readable again", self.path)
            self.file_problem = None
        if result is None:
            return
        state, self._signature = result
        before = {a.key for a in self.pool.accounts}
        self.pool.adopt(state)
        after = {a.key for a in state.accounts}
        if before != after:
            logger.log(
                ALERT, "kimi-rotator: accounts file changed: %d key(s) now (%d added, %d removed)",
                len(after), len(after - before), len(before - after),
            )

    def _note_file_problem(self, error: storage.AccountsFileError) -> None:
        message = str(error)
        if message != self.file_problem:
            logger.error(
                "kimi-rotator: cannot read the accounts file %s; serving from the last good state "
                "and not writing until it is fixed", message,
            )
        self.file_problem = message

    # -- traffic -----------------------------------------------------------------
    def is_kimi_request(self, flow: http.HTTPFlow) -> bool:
        # request.host is where mitmproxy will connect (the CONNECT target, the URL's
        # host, or the reverse-mode target), never just the client's Host header.
        return normalize_host(flow.request.host) in self.hosts

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not self.is_kimi_request(flow):
            return
        denial = access.check_client(
            from_loopback=access.is_loopback_address(flow.client_conn.peername),
            allow_remote=ctx.options.kimi_allow_remote,
            client_token=self.client_token,
            presented=access.presented_credential(flow.request.headers),
        )
        if denial is not None:
            flow.response = anthropic_error(denial.status, denial.error_type, denial.message)
            flow.comment = f"kimi-rotator: refused ({denial.status})"
            return
        lease = self.pool.acquire(now_ms())
        if isinstance(lease, Unavailable):
            flow.response = self._unavailable_response(lease)
            flow.comment = f"kimi-rotator: no key: {lease.shortage.value}"
            return
        replace_client_key(flow.request.headers, lease.key)
        flow.metadata[METADATA_KEY] = {"attempts": [_attempt_record(lease)]}
        self._leases[flow.id] = lease

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        lease = self._leases.get(flow.id)
        if lease is None or flow.response is None:
            return
        mask_sent_key(flow.request.headers, lease.key)
        content_type = flow.response.headers.get("content-type", "")
        # Errors stay buffered so their bodies can be read; success streams as it comes.
        if flow.response.status_code < 400 and content_type.startswith("text/event-stream"):
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        lease = self._leases.pop(flow.id, None)
        if lease is None or flow.response is None:
            return
        mask_sent_key(flow.request.headers, lease.key)
        response = flow.response
        body = None if response.stream else response.get_content(strict=False)
        outcome = policy.classify(response.status_code, response.headers, body, now_ms())
        self._settle(flow, lease, outcome)

    def error(self, flow: http.HTTPFlow) -> None:
        lease = self._leases.pop(flow.id, None)
        if lease is None:
            return
        mask_sent_key(flow.request.headers, lease.key)
        message = flow.error.msg if flow.error else "connection failed"
        self._settle(flow, lease, policy.classify_connection_error(message, now_ms()))

    def _settle(self, flow: http.HTTPFlow, lease: Lease, outcome: policy.Outcome) -> None:
        event = self.pool.release(lease, outcome, now_ms())
        if event:
            logger.log(ALERT, "kimi-rotator: %s", event)
        record = flow.metadata.get(METADATA_KEY, {}).get("attempts", [])
        if record:
            record[-1]["outcome"] = outcome.verdict.name.lower()
            record[-1]["reason"] = outcome.reason
        flow.comment = f"kimi-rotator: {lease.label} → {outcome.verdict.name.lower()}"

    def _unavailable_response(self, why: Unavailable) -> http.Response:
        if self.file_problem is not None and not self.pool.accounts:
            return anthropic_error(
                503, "api_error",
                f"kimi-rotator cannot read its accounts file ({self.file_problem}); fix or restore it, "
                "the proxy picks it up within a second",
            )
        if why.shortage is Shortage.NO_KEYS:
            return anthropic_error(
                503, "api_error",
                f"no Kimi API keys configured in {self.path}; run: kimi-rotator add-key sk-kimi-…",
            )
        if why.shortage is Shortage.ALL_DISABLED:
            return anthropic_error(
                503, "api_error",
                "every Kimi API key is disabled; see `kimi-rotator list-keys`, then "
                "`kimi-rotator enable-key INDEX` or add a key",
            )
        wait_s = 1
        if why.available_at_ms is not None:
            wait_s = max(1, -(-(why.available_at_ms - now_ms()) // 1000))
        return anthropic_error(
            429, "rate_limit_error",
            f"kimi-rotator: {why.shortage.value}; the next key is free in {wait_s} s",
            {"retry-after": str(wait_s)},
        )


def _attempt_record(lease: Lease) -> dict[str, Any]:
    return {"account": lease.name, "index": lease.index, "key": lease.masked_key}
