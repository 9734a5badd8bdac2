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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mitmproxy import ctx, exceptions, http
from mitmproxy.addons.clientplayback import ReplayHandler
from mitmproxy.log import ALERT

from rotator import access, policy, storage
from rotator.keys import mask_key
from rotator.models import AccountsFile
from rotator.pool import DEFAULT_MAX_IN_FLIGHT, KeyPool, Lease, Pending, apply_pending
from rotator.reset_times import seconds_until
from rotator.responses import anthropic_error
from rotator.strategies import Shortage, Unavailable
from rotator.usage import USAGES_PATH, window_reset

logger = logging.getLogger(__name__)

DEFAULT_KIMI_HOSTS = ("api.kimi.com",)
METADATA_KEY = "kimi_rotator"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MAX_WAIT_S = 30.0
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


class KeyPlacement(NamedTuple):
    """Where a pool key went in a request's headers, so masking it is one write."""

    name: bytes  # lower-case header name
    prefix: bytes  # b"Bearer " or b""
    index: int  # position in headers.fields when it was put there


def replace_client_key(headers: http.Headers, key: str) -> KeyPlacement:
    """Put `key` where the client put its own, and nowhere else.

    Bearer clients get a Bearer header; everyone else gets x-api-key (a client sending
    both gets x-api-key only). Another kind of Authorization (say Basic, for proxy auth
    in reverse mode) is left alone. Works on the raw fields in one pass: this runs for
    every request, and each Headers lookup is a scan of its own.
    """
    fields = list(headers.fields)
    api_key_at: list[int] = []
    bearer_at: list[int] = []
    for i, (name, value) in enumerate(fields):
        lowered = name.lower()
        if lowered == b"x-api-key":
            api_key_at.append(i)
        elif lowered == b"authorization" and value[:7].lower() == b"bearer ":
            bearer_at.append(i)
    secret = key.encode()
    if bearer_at and not api_key_at:
        placement = KeyPlacement(b"authorization", b"Bearer ", bearer_at[0])
        fields[placement.index] = (fields[placement.index][0], b"Bearer " + secret)
        drop = bearer_at[1:]
    elif api_key_at:
        placement = KeyPlacement(b"x-api-key", b"", api_key_at[0])
        fields[placement.index] = (fields[placement.index][0], secret)
        drop = api_key_at[1:] + bearer_at
    else:
        placement = KeyPlacement(b"x-api-key", b"", len(fields) - len(bearer_at))
        drop = bearer_at
        fields.append((b"x-api-key", secret))
    for i in reversed(drop):
        del fields[i]
    headers.fields = tuple(fields)
    return placement


def mask_sent_key(headers: http.Headers, key: str, placement: KeyPlacement | None = None) -> None:
    """Replace the pool key in a request that has gone upstream with its masked form."""
    fields = headers.fields
    secret = key.encode()
    masked = mask_key(key).encode()
    if placement is not None and placement.index < len(fields):
        name, value = fields[placement.index]
        if name.lower() == placement.name and value == placement.prefix + secret:
            headers.fields = (
                *fields[: placement.index], (name, placement.prefix + masked), *fields[placement.index + 1 :]
            )
            return
    # Another addon moved things: look everywhere.
    headers.fields = tuple((name, value.replace(secret, masked)) for name, value in fields)


def parse_seconds(option: str, text: str, least: float, most: float) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise exceptions.OptionsError(f"{option}: {text!r} is not a number of seconds") from None
    if not least <= seconds <= most:  # also refuses nan
        raise exceptions.OptionsError(f"{option} must be between {least:g} and {most:g} seconds")
    return seconds


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
        self.flush_interval_s = 1.0
        self.max_wait_s = DEFAULT_MAX_WAIT_S
        self._signature: storage.FileSignature | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._saving: asyncio.Future[None] | None = None
        # Per-flow state by flow id, kept off flow.metadata because that is saved with
        # the flow (and these hold full keys).
        self._leases: dict[str, Lease] = {}
        # Flows holding a full key in a request header, until it is masked.
        self._sent_keys: dict[str, tuple[http.HTTPFlow, str, KeyPlacement]] = {}
        self._planned: dict[str, Lease | UsageProbe] = {}
        self._probes: dict[str, UsageProbe] = {}
        self._attempt_outcomes: dict[str, policy.Outcome | None] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._key_released = asyncio.Event()

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
            f"0: every key once plus one after waiting for a key, at most {DEFAULT_MAX_ATTEMPTS}.",
        )
        loader.add_option(
            "kimi_max_wait", str, f"{DEFAULT_MAX_WAIT_S:g}",
            "Seconds a request may wait for a cooling or busy key before it is answered 429.",
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
        if "kimi_flush_interval" in updated:
            self.flush_interval_s = parse_seconds("kimi_flush_interval", ctx.options.kimi_flush_interval, 0.05, 3600)
        if "kimi_max_in_flight" in updated:
            if ctx.options.kimi_max_in_flight < 1:
                raise exceptions.OptionsError("kimi_max_in_flight must be at least 1")
            self.pool.max_in_flight = ctx.options.kimi_max_in_flight
        if "kimi_max_attempts" in updated and ctx.options.kimi_max_attempts < 0:
            raise exceptions.OptionsError("kimi_max_attempts must be 0 (automatic) or more")
        if "kimi_max_wait" in updated:
            self.max_wait_s = parse_seconds("kimi_max_wait", ctx.options.kimi_max_wait, 0, 3600)
        if "kimi_client_token_file" in updated:
            self.client_token = read_client_token(ctx.options.kimi_client_token_file)
        if {"kimi_allow_remote", "proxyauth", "kimi_client_token_file"} & updated:
            proxy_auth = ctx.options.proxyauth if "proxyauth" in ctx.options else None
            if ctx.options.kimi_allow_remote and not (proxy_auth or self.client_token):
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
            # Signature first: a change landing between the two is then re-read later.
            self._signature = storage.file_signature(path)
            state = storage.read_accounts(path)
        except storage.AccountsFileError as e:
            # A warning, not an error: mitmdump exits on errors logged while starting,
            # and clients should rather be told what is wrong with the file.
            self._note_file_problem(e, logging.WARNING)
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

    async def done(self) -> None:
        # Requests still waiting for an answer are saved as they are by `-w`'s final
        # write, which runs after this hook: mask their keys first.
        for flow, key, placement in self._sent_keys.values():
            mask_sent_key(flow.request.headers, key, placement)
        if self._flush_task is not None:
            self._flush_task.cancel()
            self._flush_task = None
        if self._saving is not None:
            # A save under way holds changes taken from the pool: let it finish.
            try:
                await self._saving
            except Exception:
                logger.exception("kimi-rotator: saving the accounts file failed")
            self._saving = None
        # Shutting down: a last save is what keeps the counts exact.
        await self._flush()

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
            await asyncio.sleep(self.flush_interval_s)
            # Shielded: stopping the loop must not drop a save that holds taken changes.
            self._saving = asyncio.ensure_future(self._flush())
            try:
                await asyncio.shield(self._saving)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a bad save stop future saves
                logger.exception("kimi-rotator: saving the accounts file failed")
            self._saving = None

    async def _flush(self) -> None:
        """Merge our changes into the file (or pick up the CLI's) in a worker thread."""
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

    @staticmethod
    def _sync(
        path: Path,
        taken: Pending,
        base_active_key: str | None,
        known: storage.FileSignature | None,
    ) -> tuple[AccountsFile, storage.FileSignature | None] | None:
        """Runs in a worker thread: merge our changes into the file, or notice the CLI's."""
        if not taken and storage.file_signature(path) == known:
            return None
        return storage.update_accounts_signed(
            path, lambda disk: apply_pending(disk, taken, base_active_key) if taken else None
        )

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

    def _note_file_problem(self, error: storage.AccountsFileError, level: int = logging.ERROR) -> None:
        message = str(error)
        if message != self.file_problem:
            serving = "serving from the last good state" if self.pool.accounts else "no keys to serve"
            logger.log(
                level, "kimi-rotator: cannot read the accounts file %s; %s and not writing until it is fixed",
                message, serving,
            )
        self.file_problem = message

    # -- traffic -----------------------------------------------------------------
    def is_kimi_request(self, flow: http.HTTPFlow) -> bool:
        # request.host is where mitmproxy will connect (the CONNECT target, the URL's
        # host, or the reverse-mode target), never just the client's Host header.
        return normalize_host(flow.request.host) in self.hosts

    async def request(self, flow: http.HTTPFlow) -> None:
        planned = self._planned.pop(flow.id, None)
        if planned is not None:  # an attempt we launched ourselves: its key is chosen
            self._send_with(flow, planned)
            return
        if flow.response is not None or not self.is_kimi_request(flow):
            return
        denial = access.check_client(
            from_loopback=access.is_loopback_address(flow.client_conn.peername),
            allow_remote=ctx.options.kimi_allow_remote,
            client_token=self.client_token,
            presented=access.presented_credential(flow.request.headers) if self.client_token else None,
        )
        if denial is not None:
            flow.response = anthropic_error(denial.status, denial.error_type, denial.message)
            flow.comment = f"kimi-rotator: refused ({denial.status})"
            return
        if flow.request.scheme == "http" and not access.is_loopback_host(flow.request.host):
            # A key must never cross a network in clear text.
            flow.request.scheme = "https"
            if flow.request.port == 80:
                flow.request.port = 443
        lease = self.pool.acquire(now_ms())
        if isinstance(lease, Unavailable):
            lease = await self._acquire_waiting(self._wait_deadline(), frozenset())
        if isinstance(lease, Unavailable):
            flow.response = self._unavailable_response(lease)
            flow.comment = f"kimi-rotator: no key: {lease.shortage.value}"
            return
        self._send_with(flow, lease)

    def _send_with(self, flow: http.HTTPFlow, lease: Lease | UsageProbe) -> None:
        if isinstance(lease, UsageProbe):
            # /usages wants the key as Bearer, whatever the client used.
            flow.request.headers.pop("x-api-key", None)
            flow.request.headers["authorization"] = "Bearer placeholder"
        placement = replace_client_key(flow.request.headers, lease.key)
        if isinstance(lease, Lease):
            self._leases[flow.id] = lease
            attempts = flow.metadata.setdefault(METADATA_KEY, {}).setdefault("attempts", [])
            attempts.append(_attempt_record(lease))
        self._sent_keys[flow.id] = (flow, lease.key, placement)

    def _mask_sent_key(self, flow: http.HTTPFlow) -> None:
        """Once the request has gone upstream, keep only the masked key in the flow."""
        sent = self._sent_keys.pop(flow.id, None)
        if sent is not None:
            mask_sent_key(flow.request.headers, sent[1], sent[2])

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._mask_sent_key(flow)
        if flow.response is None or flow.id not in self._leases:
            return
        content_type = flow.response.headers.get("content-type", "")
        # Errors stay buffered so their bodies can be read and the request retried;
        # success streams as it comes. Our own retries are buffered: their response
        # is handed to the original flow whole.
        if (
            flow.response.status_code < 400
            and content_type.startswith("text/event-stream")
            and flow.id not in self._attempt_outcomes
        ):
            flow.response.stream = True

    async def response(self, flow: http.HTTPFlow) -> None:
        self._mask_sent_key(flow)
        if flow.response is None:
            return
        probe = self._probes.pop(flow.id, None)
        if probe is not None:
            self._apply_usage_answer(probe, flow.response)
            return
        lease = self._leases.pop(flow.id, None)
        if lease is None:
            return
        response = flow.response
        # Only error bodies say anything about the key; a success is never read.
        readable = not response.stream and response.status_code >= 400
        body = response.get_content(strict=False) if readable else None
        outcome = policy.classify(response.status_code, response.headers, body, now_ms())
        self._settle(flow, lease, outcome)
        if outcome.window is not None:
            self._ask_usages(flow, lease.key, outcome.window)
        if flow.id in self._attempt_outcomes:
            self._attempt_outcomes[flow.id] = outcome
        elif outcome.retry_elsewhere and not response.stream:
            await self._retry_elsewhere(flow, lease)

    def error(self, flow: http.HTTPFlow) -> None:
        self._mask_sent_key(flow)
        self._probes.pop(flow.id, None)
        lease = self._leases.pop(flow.id, None)
        if lease is None:
            return
        message = flow.error.msg if flow.error else "connection failed"
        answered = flow.response.status_code if flow.response is not None else None
        outcome = policy.classify_connection_error(message, now_ms(), answered)
        self._settle(flow, lease, outcome)
        if flow.id in self._attempt_outcomes:
            self._attempt_outcomes[flow.id] = outcome

    def _settle(self, flow: http.HTTPFlow, lease: Lease, outcome: policy.Outcome) -> None:
        event = self.pool.release(lease, outcome, now_ms())
        if event:
            logger.log(ALERT, "kimi-rotator: %s", event)
        # Wake requests waiting for a key: this one may be free now.
        self._key_released.set()
        self._key_released = asyncio.Event()
        attempts = flow.metadata.get(METADATA_KEY, {}).get("attempts", [])
        if attempts:
            attempts[-1]["outcome"] = outcome.verdict.value
            attempts[-1]["reason"] = outcome.reason
        flow.comment = f"kimi-rotator: {lease.label} → {outcome.verdict.value}"

    # -- retrying on another key ---------------------------------------------------
    async def _retry_elsewhere(self, flow: http.HTTPFlow, failed: Lease) -> None:
        """Send the request again with other keys until one answers or none is left.

        The client sees only the last answer. Each attempt is a flow of its own
        (replayed through mitmproxy, so upstream proxies and TLS settings apply), counted
        on its own key and listed in the original flow's metadata.
        """
        tried = {failed.key}
        deadline = self._wait_deadline()
        max_attempts = self._max_attempts()
        outcome: policy.Outcome | None = None
        while len(flow.metadata[METADATA_KEY]["attempts"]) < max_attempts:
            lease = await self._acquire_waiting(deadline, tried)
            if isinstance(lease, Unavailable):
                flow.response = self._unavailable_response(lease)
                flow.comment += f"; no other key: {lease.shortage.value}"
                return
            tried.add(lease.key)
            outcome = await self._send_attempt(flow, lease)
            if not outcome.retry_elsewhere:
                return
        # Out of attempts on refusals: if no key can serve now, say when one can.
        if outcome is None or outcome.retry_elsewhere:
            available = self.pool.peek(now_ms())
            if isinstance(available, Unavailable):
                flow.response = self._unavailable_response(available)

    def _copy_to_resend(self, flow: http.HTTPFlow, lease: Lease | UsageProbe, note: dict[str, str]) -> http.HTTPFlow:
        """A fresh copy of `flow`'s request that our `request` hook will send with `lease`."""
        copy = flow.copy()
        # Marked as a replay, as mitmproxy's own client replay does, so proxyauth and
        # other addons treat it as the already-admitted request it is.
        copy.is_replay = "request"
        copy.response = None
        copy.error = None
        copy.comment = ""
        copy.metadata[METADATA_KEY] = note
        self._planned[copy.id] = lease
        return copy

    async def _replay(self, copy: http.HTTPFlow) -> None:
        """Send a copy through mitmproxy (same upstream mode and TLS settings as any flow)."""
        try:
            await ReplayHandler(copy, ctx.options).replay()
        finally:
            self._planned.pop(copy.id, None)
            self._sent_keys.pop(copy.id, None)

    async def _send_attempt(self, flow: http.HTTPFlow, lease: Lease) -> policy.Outcome:
        attempt = self._copy_to_resend(flow, lease, {"retry_of": flow.id})
        self._attempt_outcomes[attempt.id] = None
        try:
            await self._replay(attempt)
        except Exception as e:  # a failed resend must not take the client's answer with it
            logger.exception("kimi-rotator: resending on another key failed")
            if self._leases.pop(attempt.id, None) is not None:
                self.pool.release(lease, policy.classify_connection_error(str(e), now_ms()), now_ms())
        finally:
            outcome = self._attempt_outcomes.pop(attempt.id, None)
        # The client's flow shows the (masked) key that gave its answer.
        for name in ("x-api-key", "authorization"):
            if name in attempt.request.headers:
                flow.request.headers[name] = attempt.request.headers[name]
        record = attempt.metadata.get(METADATA_KEY, {}).get("attempts", [_attempt_record(lease)])
        flow.metadata[METADATA_KEY]["attempts"].extend(record)
        if outcome is None:
            outcome = policy.classify_connection_error("no answer", now_ms())
        if attempt.response is not None:
            flow.response = attempt.response
        else:
            detail = attempt.error.msg if attempt.error else "no answer"
            flow.response = anthropic_error(502, "api_error", f"kimi-rotator: resending on another key failed: {detail}")
        flow.comment = f"kimi-rotator: {lease.label} → {outcome.verdict.value} (attempt {len(flow.metadata[METADATA_KEY]['attempts'])})"
        return outcome

    async def _acquire_waiting(self, deadline_ms: int, tried: Collection[str]) -> Lease | Unavailable:
        """A key, waiting (not spinning) up to the deadline for one to free up."""
        while True:
            now = now_ms()
            lease = self.pool.acquire(now, tried)
            if isinstance(lease, Lease):
                return lease
            if tried:
                # A tried key whose cooldown already ended (or a shared pause) may serve again.
                lease = self.pool.acquire(now)
                if isinstance(lease, Lease):
                    return lease
            frees_at = lease.available_at_ms
            if frees_at is not None and frees_at <= deadline_ms:
                wait_ms = frees_at - now  # a cooldown or the shared pause ends in time
            elif self.pool.is_busy(tried) and now < deadline_ms:
                wait_ms = deadline_ms - now  # a key at its in-flight cap; woken on release
            else:
                return lease
            released = self._key_released
            try:
                await asyncio.wait_for(released.wait(), timeout=max(wait_ms, 1) / 1000)
            except asyncio.TimeoutError:
                pass

    def _wait_deadline(self) -> int:
        return now_ms() + int(self.max_wait_s * 1000)

    def _max_attempts(self) -> int:
        configured = ctx.options.kimi_max_attempts
        if configured > 0:
            return configured
        # Every key once, plus one on whichever frees up first within kimi_max_wait.
        return max(1, min(DEFAULT_MAX_ATTEMPTS, len(self.pool.accounts) + 1))

    # -- a plan window's exact reset ---------------------------------------------------
    def _ask_usages(self, flow: http.HTTPFlow, key: str, window: policy.Window) -> None:
        """Ask /coding/v1/usages with the exhausted key when its window really resets."""
        probe = UsageProbe(key, window)
        probe_flow = self._copy_to_resend(flow, probe, {"usage_probe": mask_key(key)})
        request = probe_flow.request
        request.method = "GET"
        request.path = USAGES_PATH
        request.content = b""
        request.headers.pop("content-type", None)
        self._probes[probe_flow.id] = probe
        task = asyncio.get_running_loop().create_task(self._send_probe(probe_flow))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_probe(self, probe_flow: http.HTTPFlow) -> None:
        try:
            await self._replay(probe_flow)
        except Exception:
            logger.warning("kimi-rotator: asking Kimi for the exact reset time failed", exc_info=True)
        finally:
            self._probes.pop(probe_flow.id, None)

    def _apply_usage_answer(self, probe: UsageProbe, response: http.Response) -> None:
        if response.status_code != 200:
            return
        deadline = window_reset(response.get_content(strict=False) or b"", probe.window, now_ms())
        if deadline is None:
            return
        event = self.pool.set_exact_reset(probe.key, deadline, now_ms())
        if event:
            logger.log(ALERT, "kimi-rotator: %s", event)

    # -- answers of our own --------------------------------------------------------------
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
                "`kimi-rotator enable-key INDEX` or add a key. " + self._key_summary(now_ms()),
            )
        now = now_ms()
        wait_s = 1
        if why.available_at_ms is not None:
            wait_s = max(1, seconds_until(why.available_at_ms, now))
        return anthropic_error(
            429, "rate_limit_error",
            f"kimi-rotator: {why.shortage.value}; the next key is free in {wait_s} s. "
            + self._key_summary(now),
            {"retry-after": str(wait_s)},
        )

    def _key_summary(self, now: int, most: int = 20) -> str:
        parts = []
        for index, account in enumerate(self.pool.accounts[:most]):
            label = f"[{index}] {mask_key(account.key)}"
            if account.disabled_reason is not None:
                parts.append(f"{label} disabled ({account.disabled_reason})")
            elif account.rate_limit_reset_time > now:
                seconds = seconds_until(account.rate_limit_reset_time, now)
                parts.append(f"{label} free in {seconds} s")
            else:
                parts.append(f"{label} busy")
        more = len(self.pool.accounts) - most
        if more > 0:
            parts.append(f"and {more} more")
        return "Keys: " + "; ".join(parts) + "."


@dataclass(frozen=True, slots=True)
class UsageProbe:
    """A /usages request we send with an exhausted key; not counted as an attempt."""

    key: str
    window: policy.Window


def _attempt_record(lease: Lease) -> dict[str, Any]:
    return {"account": lease.name, "index": lease.index, "key": lease.masked_key}
