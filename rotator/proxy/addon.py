"""The mitmproxy addon: options, lifecycle and thin hooks that put a pool key on each Kimi
request and learn from each answer.

Deciding lives elsewhere (rotator.strategies picks keys, rotator.policy reads answers,
rotator.pool keeps the state, rotator.proxy.retry retries); the hooks wire those to
flows through the ledger (rotator.proxy.flows). Hooks are synchronous on the common
path and return an awaitable only when a request must wait or be resent, so a request
that gets a key at once costs no extra task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.log import ALERT

from rotator import access, policy
from rotator.clock import SYSTEM_CLOCK, Clock
from rotator.keys import mask_key
from rotator.models import AccountsFile
from rotator.pool import DEFAULT_MAX_IN_FLIGHT, KeyPool, Lease
from rotator.proxy import answers, retry, upstream
from rotator.proxy.flows import (
    METADATA_KEY,
    FlowKind,
    FlowLedger,
    FlowRecord,
    attempt_note,
)
from rotator.proxy.options import (
    CLIENT_TOKEN_ENV,
    DEFAULT_KIMI_HOSTS,
    DEFAULT_MAX_WAIT_S,
    normalize_host,
    parse_hosts,
    parse_seconds,
    read_client_token,
)
from rotator.store.file import (
    ACCOUNTS_ENV,
    ACCOUNTS_FILENAME,
    FileStore,
    resolve_accounts_path,
)
from rotator.strategies import Unavailable
from rotator.sync import PoolSync
from rotator.usage import USAGES_PATH, window_reset

logger = logging.getLogger(__name__)

Send = Callable[[http.HTTPFlow], Awaitable[None]]


class KimiRotator:
    def __init__(self, clock: Clock = SYSTEM_CLOCK, send: Send = upstream.send) -> None:
        self.clock = clock
        self.send_upstream = send  # how requests of our own go out (injected in tests)
        self.hosts: frozenset[str] = frozenset(DEFAULT_KIMI_HOSTS)
        self.client_token: str | None = None
        self.flush_interval_s = 1.0
        self.max_wait_ms = int(DEFAULT_MAX_WAIT_S * 1000)
        self.max_attempts_option = 0
        self.allow_remote = False
        self.pool = KeyPool(AccountsFile(), clock=clock)
        self.sync: PoolSync | None = None
        self.ledger = FlowLedger()
        self._running = False
        self._probing: dict[str, asyncio.Task[None]] = {}  # one /usages probe per key at most
        self._background: set[asyncio.Task[None]] = set()

    def load(self, loader: Any) -> None:
        loader.add_option(
            "kimi_accounts", str, "",
            f"Accounts file. Default: ${ACCOUNTS_ENV}, else the user config folder's "
            f"kimi-rotator/{ACCOUNTS_FILENAME}.",
        )
        loader.add_option(
            "kimi_hosts", Sequence[str], list(DEFAULT_KIMI_HOSTS),
            "Hosts that get pool keys (exact names, case-insensitive). Others pass untouched.",
        )
        loader.add_option(
            # Seconds as text: mitmproxy's --set cannot parse float options.
            "kimi_flush_interval", str, "1.0",
            "Seconds between saves of the pool's state (and checks for changes by the CLI).",
        )
        loader.add_option(
            "kimi_max_in_flight", int, DEFAULT_MAX_IN_FLIGHT,
            "Requests one key may have in flight at once; a key at its cap is not chosen.",
        )
        loader.add_option(
            "kimi_max_attempts", int, 0,
            f"Attempts per request, each on another key, before the client gets the error. "
            f"0: every key once plus one after waiting for a key, at most {retry.DEFAULT_MAX_ATTEMPTS}.",
        )
        loader.add_option(
            "kimi_max_wait", str, f"{DEFAULT_MAX_WAIT_S:g}",
            "Seconds a request may wait for a cooling or busy key (retries included) before it is answered 429.",
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
        options = ctx.options
        if "kimi_hosts" in updated:
            try:
                self.hosts = parse_hosts(options.kimi_hosts)
            except ValueError as e:
                raise exceptions.OptionsError(f"kimi_hosts: {e}") from e
        if "kimi_flush_interval" in updated:
            self.flush_interval_s = parse_seconds("kimi_flush_interval", options.kimi_flush_interval, 0.05, 3600)
            if self.sync is not None:
                self.sync.interval_s = self.flush_interval_s
        if "kimi_max_in_flight" in updated:
            if options.kimi_max_in_flight < 1:
                raise exceptions.OptionsError("kimi_max_in_flight must be at least 1")
            self.pool.max_in_flight = options.kimi_max_in_flight
        if "kimi_max_attempts" in updated:
            if options.kimi_max_attempts < 0:
                raise exceptions.OptionsError("kimi_max_attempts must be 0 (automatic) or more")
            self.max_attempts_option = options.kimi_max_attempts
        if "kimi_max_wait" in updated:
            self.max_wait_ms = int(parse_seconds("kimi_max_wait", options.kimi_max_wait, 0, 3600) * 1000)
        if "kimi_client_token_file" in updated:
            self.client_token = read_client_token(options.kimi_client_token_file)
        if {"kimi_allow_remote", "proxyauth", "kimi_client_token_file"} & updated:
            proxy_auth = options.proxyauth if "proxyauth" in options else None
            if options.kimi_allow_remote and not (proxy_auth or self.client_token):
                raise exceptions.OptionsError(
                    "kimi_allow_remote needs proxyauth or a client token "
                    f"(kimi_client_token_file or ${CLIENT_TOKEN_ENV}): otherwise anyone who "
                    "can reach the proxy spends your keys"
                )
            self.allow_remote = options.kimi_allow_remote
        if "kimi_accounts" in updated:
            self._open_store(FileStore(resolve_accounts_path(options.kimi_accounts or None)))

    def _open_store(self, store: FileStore) -> None:
        # Runs at start-up and on option changes only, never per request.
        previous = self.sync
        self.pool = KeyPool(AccountsFile(), self.pool.max_in_flight, self.clock)
        self.sync = PoolSync(store, self.pool, self.flush_interval_s)
        state = self.sync.load()
        if previous is not None and self._running:
            self._in_background(previous.stop())  # the old store gets its last changes
            self.sync.start()
        if state is None:
            return
        if not state.accounts:
            logger.warning(
                "kimi-rotator: no Kimi API keys in %s; add one with: kimi-rotator add-key sk-kimi-…", store.location
            )
        else:
            logger.log(
                ALERT, "kimi-rotator: %d key(s) from %s, strategy %s",
                len(state.accounts), store.location, state.rotation_strategy,
            )

    # -- lifecycle ---------------------------------------------------------------
    def running(self) -> None:
        self._running = True
        self._warn_if_listening_beyond_loopback()
        if self.sync is not None:
            self.sync.start()

    async def done(self) -> None:
        # Requests still waiting for an answer are saved as they are by `-w`'s final
        # write, which runs after this hook: mask their keys first.
        self.ledger.mask_all()
        for task in [*self._probing.values(), *self._background]:
            task.cancel()
        await asyncio.gather(*self._probing.values(), *self._background, return_exceptions=True)
        if self.sync is not None:
            await self.sync.stop()

    def _warn_if_listening_beyond_loopback(self) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        addresses = proxyserver.listen_addrs() if proxyserver else []
        exposed = [a for a in addresses if not access.is_loopback_address(a)]
        if exposed:
            where = ", ".join(f"{a[0]}:{a[1]}" for a in exposed)
            if self.allow_remote:
                logger.warning("kimi-rotator: listening on %s; remote clients may use the pool", where)
            else:
                logger.warning(
                    "kimi-rotator: listening on %s, beyond this machine; only local clients get keys, "
                    "others get 403. Use --listen-host 127.0.0.1 to stay local.", where,
                )

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- traffic -----------------------------------------------------------------
    def is_kimi_request(self, flow: http.HTTPFlow) -> bool:
        # request.host is where mitmproxy will connect (the CONNECT target, the URL's
        # host, or the reverse-mode target), never just the client's Host header.
        return normalize_host(flow.request.host) in self.hosts

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        record = self.ledger.get(flow.id)
        if record is not None:
            if record.kind is not FlowKind.CLIENT:  # our own attempt or probe: its key is chosen
                self.ledger.put_key(record, bearer=record.kind is FlowKind.PROBE)
            return None
        if flow.response is not None or not self.is_kimi_request(flow):
            return None
        denial = access.check_client(
            from_loopback=access.is_loopback_address(flow.client_conn.peername),
            allow_remote=self.allow_remote,
            client_token=self.client_token,
            presented=access.presented_credential(flow.request.headers) if self.client_token else None,
        )
        if denial is not None:
            flow.response = answers.refused(denial)
            flow.comment = f"kimi-rotator: refused ({denial.status})"
            return None
        if flow.request.scheme == "http" and not access.is_loopback_host(flow.request.host):
            # A key must never cross a network in clear text.
            flow.request.scheme = "https"
            if flow.request.port == 80:
                flow.request.port = 443
        now = self.clock.now_ms()
        deadline = now + self.max_wait_ms  # one deadline for waiting and every retry
        lease = self.pool.acquire(now)
        if isinstance(lease, Lease):
            self._send_with(flow, lease, deadline)
            return None
        return self._wait_for_key(flow, deadline)

    async def _wait_for_key(self, flow: http.HTTPFlow, deadline_ms: int) -> None:
        lease = await self.pool.acquire_waiting(deadline_ms)
        if isinstance(lease, Unavailable):
            flow.response = self._no_key_answer(lease)
            flow.comment = f"kimi-rotator: no key: {lease.shortage.value}"
            return
        self._send_with(flow, lease, deadline_ms)

    def _send_with(self, flow: http.HTTPFlow, lease: Lease, deadline_ms: int) -> None:
        record = self.ledger.open(FlowRecord(FlowKind.CLIENT, flow, lease.key, lease, deadline_ms))
        record.attempts.append(attempt_note(lease))
        self.ledger.put_key(record)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = self.ledger.get(flow.id)
        if record is None:
            return
        self.ledger.mask(record)  # the request has gone upstream
        response = flow.response
        # Errors stay buffered so their bodies can be read and the request retried;
        # success streams as it comes. Our own resends stay buffered: their answer is
        # handed to the client's flow whole.
        if (
            record.kind is FlowKind.CLIENT
            and response is not None
            and response.status_code < 400
            and response.headers.get("content-type", "").startswith("text/event-stream")
        ):
            response.stream = True

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        record = self.ledger.forget(flow.id)
        if record is None or flow.response is None:
            return None
        response = flow.response
        if record.kind is FlowKind.PROBE:
            self._apply_usage_answer(record, response)
            return None
        lease = record.lease
        if lease is None:
            return None
        # Only error bodies say anything about the key; a success is never read.
        readable = not response.stream and response.status_code >= 400
        body = response.get_content(strict=False) if readable else None
        outcome = policy.classify(response.status_code, response.headers, body, self.clock.now_ms())
        self._settle(record, outcome)
        if outcome.window is not None:
            self._probe_usages(record, outcome.window)
        if record.kind is FlowKind.CLIENT:
            if outcome.retry_elsewhere and not response.stream:
                return self._retry(record, lease)
            self._show_fresh_attempts(record)
        return None

    def error(self, flow: http.HTTPFlow) -> None:
        record = self.ledger.forget(flow.id)
        if record is None or record.lease is None:
            return
        message = flow.error.msg if flow.error else "connection failed"
        answered = flow.response.status_code if flow.response is not None else None
        self._settle(record, policy.classify_connection_error(message, self.clock.now_ms(), answered))
        if record.kind is FlowKind.CLIENT:
            self._show_fresh_attempts(record)

    def _settle(self, record: FlowRecord, outcome: policy.Outcome) -> None:
        lease = record.lease
        assert lease is not None
        record.lease = None
        record.outcome = outcome
        event = self.pool.release(lease, outcome, self.clock.now_ms())
        if event:
            logger.log(ALERT, "kimi-rotator: %s", event)
        note = record.attempts[-1]
        note["outcome"] = outcome.verdict.value
        note["reason"] = outcome.reason
        if record.kind is FlowKind.ATTEMPT:
            self.ledger.show_attempts(record)
        record.flow.comment = f"kimi-rotator: {lease.label} → {outcome.verdict.value}"

    # -- retrying on another key ---------------------------------------------------
    async def _retry(self, client: FlowRecord, failed: Lease) -> None:
        """Resend on other keys; the client sees only the last answer. Each attempt is a
        flow of its own, counted on its own key and listed in the client flow's metadata."""

        async def send(lease: Lease) -> policy.Outcome:
            return await self._send_attempt(client, lease)

        why = await retry.retry_elsewhere(
            self.pool, send,
            tried={failed.key},
            attempts_made=len(client.attempts),
            most_attempts=retry.max_attempts(self.max_attempts_option, len(self.pool.accounts)),
            deadline_ms=client.deadline_ms,
        )
        if why is not None:
            client.flow.response = self._no_key_answer(why)
            client.flow.comment += f"; no other key: {why.shortage.value}"
        self._show_fresh_attempts(client)

    async def _send_attempt(self, client: FlowRecord, lease: Lease) -> policy.Outcome:
        flow = client.flow
        copy = upstream.copy_to_resend(flow)
        copy.metadata[METADATA_KEY] = {"retry_of": flow.id}
        attempt = self.ledger.open(FlowRecord(FlowKind.ATTEMPT, copy, lease.key, lease, client.deadline_ms))
        attempt.attempts.append(attempt_note(lease))
        detail = "no answer"
        try:
            await self.send_upstream(copy)
        except Exception as e:  # a failed resend must not take the client's answer with it
            logger.exception("kimi-rotator: resending on another key failed")
            detail = str(e) or type(e).__name__
        finally:
            self.ledger.forget(copy.id)  # masks the key, whatever happened
        if attempt.lease is not None:  # no answer and no error reached the hooks
            self._settle(attempt, policy.classify_connection_error(detail, self.clock.now_ms()))
        assert attempt.outcome is not None
        client.attempts.extend(attempt.attempts)
        # The client's flow shows the (masked) key that gave its answer.
        for name in ("x-api-key", "authorization"):
            if name in copy.request.headers:
                flow.request.headers[name] = copy.request.headers[name]
        if copy.response is not None:
            flow.response = copy.response
        else:
            flow.response = answers.resend_failed(copy.error.msg if copy.error else detail)
        flow.comment = (
            f"kimi-rotator: {lease.label} → {attempt.outcome.verdict.value} (attempt {len(client.attempts)})"
        )
        return attempt.outcome

    def _show_fresh_attempts(self, client: FlowRecord) -> None:
        # A replayed saved flow arrives with its old attempts in its metadata: the
        # record's list, counted afresh, replaces them.
        client.flow.metadata.pop(METADATA_KEY, None)
        self.ledger.show_attempts(client)

    def _no_key_answer(self, why: Unavailable) -> http.Response:
        assert self.sync is not None
        return answers.no_key(
            why, self.pool.state, self.clock.now_ms(), self.sync.store.location, self.sync.problem
        )

    # -- a plan window's exact reset ---------------------------------------------------
    def _probe_usages(self, refused: FlowRecord, window: policy.Window) -> None:
        """Ask /coding/v1/usages with the exhausted key when its window really resets:
        one probe per key at a time, however many requests it refused."""
        key = refused.key
        if key in self._probing:
            return
        request = refused.flow.request
        probe = upstream.fresh_request(
            "GET", request.scheme, request.host, request.port, USAGES_PATH, upstream.client_identity(request)
        )
        probe.metadata[METADATA_KEY] = {"usage_probe": mask_key(key)}
        self.ledger.open(FlowRecord(FlowKind.PROBE, probe, key, window=window))
        task = asyncio.get_running_loop().create_task(self._send_probe(probe))
        self._probing[key] = task
        task.add_done_callback(lambda _: self._probing.pop(key, None))

    async def _send_probe(self, probe: http.HTTPFlow) -> None:
        try:
            await self.send_upstream(probe)
        except Exception:
            logger.warning("kimi-rotator: asking Kimi for the exact reset time failed", exc_info=True)
        finally:
            self.ledger.forget(probe.id)

    def _apply_usage_answer(self, probe: FlowRecord, response: http.Response) -> None:
        if response.status_code != 200 or probe.window is None:
            return
        now = self.clock.now_ms()
        deadline = window_reset(response.get_content(strict=False) or b"", probe.window, now)
        if deadline is None:
            return
        event = self.pool.set_exact_reset(probe.key, deadline, now)
        if event:
            logger.log(ALERT, "kimi-rotator: %s", event)
