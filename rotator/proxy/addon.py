"""The mitmproxy addon: options, lifecycle and thin hooks that put a pool key on each Kimi
request and learn from each answer.

Deciding lives elsewhere (rotator.core.strategies picks keys, rotator.core.policy reads answers,
rotator.pool.key_pool keeps the state, rotator.proxy.retry retries); the hooks wire those to
flows through the ledger (rotator.proxy.flows). Hooks are synchronous on the common
path and return an awaitable only when a request must wait or be resent, so a request
that gets a key at once costs no extra task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from rotator.core import access, policy
from rotator.core.background import Background
from rotator.core.clock import SYSTEM_CLOCK, Clock
from rotator.notify.pool_listener import PoolNotifications
from rotator.pool.key_pool import DEFAULT_MAX_IN_FLIGHT
from rotator.conversations.ids import Conversation, conversation_of
from rotator.conversations.pins import PinTable
from rotator.pool.affinity import Turn
from rotator.pool.lease import Lease
from rotator.proxy import answers, bodies, retry, splice, startup_checks, token_reading, upstream
from rotator.proxy.assembly import Assembly, Shell, assemble
from rotator.proxy.client_host import NOTHING_SEEN, ClientHost, Seen
from rotator.proxy.commands import RotatorCommands
from rotator.proxy.flows import CLIENT, POLL, FlowLedger, FlowRecord, attempt_note, client_gone
from rotator.proxy.options import (
    Settings,
    add_options,
    normalize_host,
    read_settings,
    warn_if_listening_beyond_loopback,
    warn_if_store_exposed,
)
from rotator.core.strategies import Unavailable
from rotator.pool.waitline import ABANDONED, Abandoned
from rotator.proxy.headers import is_event_stream
from rotator.proxy.notify_option import add_notify_options, close_notify, configure_notify
from rotator.proxy.polls import poll_target
from rotator.proxy.splice import Splice
from rotator.proxy.status_page import StatusPage
from rotator.status.tally import Tally
from rotator.status.timeline import Timeline
from rotator.store import StateStore, StoreError, open_store
from rotator.tokens import Shape, shape_for_path

logger = logging.getLogger(__name__)


class KimiRotator:
    def __init__(self, clock: Clock = SYSTEM_CLOCK, send: upstream.Send = upstream.send) -> None:
        self.clock = clock
        self.send_upstream = send  # how requests of our own go out (injected in tests)
        self.settings = Settings()
        self.ledger = FlowLedger()
        self.tally = Tally()  # this process's counts, for metrics and the status page
        self.timeline = Timeline()  # the pool's recent state changes, as logged
        self.notify = PoolNotifications(clock)  # what a person is told (kimi_notify)
        self.pins = PinTable(self.settings.affinity_ttl_ms)  # live conversations' keys (event loop only)
        self._shell = Shell(
            self.ledger, send, clock, self._no_key_answer, self.tally,
            listeners=(self.notify,), store_heard=self.notify.store_problem, pins=self.pins,
        )
        self._use(assemble(self._shell, self.settings, max_in_flight=DEFAULT_MAX_IN_FLIGHT))
        self._running = False
        self._background = Background()
        # Parts that read this addon's state, loaded and run by it rather than as child
        # addons: mitmproxy visits every addon in the tree for every event of every flow
        # (~8 a request), and children would pay for hooks they don't have (figures:
        # bench/README.md).
        self.status_page = StatusPage(self)
        self.commands = RotatorCommands(self)
        self.client_host = ClientHost()  # the name a reverse-mode client gave the proxy
        # A hook only while request bodies may be streamed (see configure).
        self.requestheaders: Callable[[http.HTTPFlow], Awaitable[None] | None] | None = None

    def load(self, loader: Any) -> None:
        add_options(loader)
        add_notify_options(loader)
        self.status_page.load(loader)
        startup_checks.check_deferred(loader.master.options)
        startup_checks.install_one_line_option_errors()
        # What mitmproxy does with each addon it registers, for a part that is none.
        loader.master.commands.collect_commands(self.commands)

    def configure(self, updated: set[str]) -> None:
        self.settings = read_settings(self.settings, ctx.options, updated)
        self.client_host.configure(ctx.options, updated)
        configure_notify(self.notify, ctx.options, updated)
        if "stream_large_bodies" in updated:
            # Without streamed request bodies, requests need no hook before `request`:
            # mitmproxy then calls none, and the hot path pays nothing for this one.
            self.requestheaders = self._before_streaming if self.settings.stream_limit is not None else None
        if "kimi_flush_interval" in updated and self.sync is not None:
            self.sync.interval_s = self.settings.flush_interval_s
        if "kimi_slot_ttl" in updated and self.team is not None:
            self.team.set_ttl(self.settings.slot_ttl_ms)
        if "kimi_member" in updated:
            self.pool.member = self.settings.member if self.team is not None else None
        if "kimi_max_in_flight" in updated:
            self.pool.max_in_flight = self.settings.max_in_flight
        if "kimi_affinity_ttl" in updated:
            self.pins.ttl_ms = self.settings.affinity_ttl_ms
        if "kimi_quota_reserve" in updated:
            self.pool.quota_reserve_percent = self.settings.quota_reserve_percent
        if {"mode", "kimi_hosts"} & updated:
            self.polls.default_target = poll_target(ctx.options.mode, self.settings.hosts)
            startup_checks.warn_of_reverse_targets_not_kimi(ctx.options.mode, self.settings.hosts)
        if "kimi_usage_interval" in updated:
            self.polls.interval_s = self.settings.usage_interval_s
            if self._running:
                self.polls.restart()
        if {"kimi_accounts", "kimi_store", "kimi_store_prefix"} & updated:
            settings = self.settings
            try:
                store = open_store(settings.store, settings.accounts_path, settings.store_prefix, self.clock)
            except StoreError as e:
                raise exceptions.OptionsError(f"kimi_store: {e}") from e
            self._open_store(store)
        self.status_page.configure(updated)

    def _open_store(self, store: StateStore) -> None:
        # Runs at start-up and on option changes only, never per request.
        previous = self.parts
        self._use(assemble(self._shell, self.settings, store, self.pool.max_in_flight))
        self.polls.default_target = previous.polls.default_target
        assert self.sync is not None
        state = self.sync.load()
        if previous.sync is not None and self._running:
            self._background.start(previous.let_go())  # it gets its last changes
            self._background.start(previous.polls.stop())
            self.parts.start()
        if state is not None:
            startup_checks.announce_keys(state, store)

    def _use(self, parts: Assembly) -> None:
        self.parts = parts
        self.pool, self.line, self.polls, self.attempts = parts.pool, parts.line, parts.polls, parts.attempts
        self.sync, self.team, self.notices = parts.sync, parts.team, parts.notices
        self.affinity, self.shared_pins = parts.affinity, parts.shared_pins

    # -- lifecycle ---------------------------------------------------------------
    def running(self) -> Awaitable[None] | None:
        self._running = True
        self.timeline.attach()
        warn_if_listening_beyond_loopback(self.settings.allow_remote)
        warn_if_store_exposed(self.settings.store)
        self.parts.start()
        self.polls.start()
        startup_checks.freeze_what_lives_on()
        return self.status_page.running()

    async def done(self) -> None:
        # Requests still waiting for an answer are saved as they are by `-w`'s final
        # write, which runs after this hook: mask their keys first.
        self.ledger.mask_all()
        await self.polls.stop()
        await self._background.stop(cancel=True)
        await self.parts.let_go()
        self.timeline.detach()
        await self.status_page.done()
        await asyncio.to_thread(close_notify, self.notify)

    # -- traffic -----------------------------------------------------------------
    def server_connect(self, data: ServerConnectionHookData) -> None:
        self.client_host.server_connect(data)

    def is_kimi_request(self, flow: http.HTTPFlow) -> bool:
        # request.host is where mitmproxy will connect (the CONNECT target, the URL's
        # host, or the reverse-mode target), never just the client's Host header.
        return normalize_host(flow.request.host) in self.settings.hosts

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        record = self.ledger.get(flow.id)
        if record is not None:
            if record.kind is not CLIENT:  # our own attempt or probe: its key is chosen
                self.ledger.put_key(record, bearer=record.kind is POLL)
            return None
        seen = self.client_host.take(flow)  # before anything goes upstream
        if flow.response is not None or not self.is_kimi_request(flow):
            return None
        if flow.request.stream:  # its headers are gone already, with the client's own key
            flow.comment = "kimi-rotator: no pool key: its body was streamed before one could be put on"
            return None
        return self._admit(flow, seen)

    def _before_streaming(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """requestheaders, with stream_large_bodies: a streamed body's headers go upstream
        before `request` runs, so such a request gets its key now."""
        if not bodies.may_stream(flow.request) or self.ledger.get(flow.id) is not None:
            return None
        seen = self.client_host.take(flow)
        if flow.response is not None or not self.is_kimi_request(flow):
            return None
        return self._admit(flow, seen, streamed=True)

    def _admit(self, flow: http.HTTPFlow, seen: Seen, streamed: bool = False) -> Awaitable[None] | None:
        settings = self.settings
        denial = access.check_client(
            from_loopback=access.is_loopback_address(flow.client_conn.peername),
            allow_remote=settings.allow_remote,
            client_token=settings.client_token,
            presented=access.presented_credential(flow.request.headers) if settings.client_token else None,
        )
        if denial is None and seen is not NOTHING_SEEN:  # NOTHING_SEEN: no page's request
            denial = access.check_page(
                addressed=seen.addressed, origin=seen.origin, fetch_site=seen.fetch_site,
                own_hosts=settings.hosts, allow_remote=settings.allow_remote,
                token_presented=settings.client_token is not None,  # check_client found it presented
            )
        if denial is not None:
            if denial in (access.FOREIGN_HOST, access.FOREIGN_PAGE):
                self.client_host.tell_once(denial, seen)
            self.tally.answered_itself(f"client refused ({denial.status})")
            answers.give(flow, answers.refused(denial), f"kimi-rotator: refused ({denial.status})", streamed=streamed)
            return None
        if flow.request.scheme == "http" and not access.is_loopback_host(flow.request.host):
            # A key must never cross a network in clear text.
            flow.request.scheme = "https"
            if flow.request.port == 80:
                flow.request.port = 443
        now = self.clock.now_ms()
        deadline = now + self.settings.max_wait_ms  # one deadline for waiting and every retry
        conversation = conversation_in(flow.request, streamed) if settings.affinity else None
        if self.team is not None:  # the team's slot on the key is one round trip away
            return self._team_turn(flow, deadline, streamed, conversation)
        turn, first = (None, None) if conversation is None else self.affinity.begin(conversation, now)
        lease = first if turn is not None else self.pool.acquire(now)
        if isinstance(lease, Lease):
            self._send_with(flow, lease, deadline, turn)
            return None
        return self._wait_for_key(flow, deadline, streamed, turn)

    async def _team_turn(
        self, flow: http.HTTPFlow, deadline_ms: int, streamed: bool, conversation: Conversation | None
    ) -> None:
        turn, first = None, None
        if conversation is not None:
            if self.shared_pins is not None:
                await self.shared_pins.recall(conversation)  # where the team has it
            turn, first = self.affinity.begin(conversation, self.clock.now_ms())
        await self._wait_for_key(flow, deadline_ms, streamed, turn, first)

    async def _wait_for_key(
        self, flow: http.HTTPFlow, deadline_ms: int, streamed: bool, turn: Turn | None = None,
        first: Lease | None = None,
    ) -> None:
        lease: Lease | Unavailable | Abandoned | None = None
        admit = self.line.admit
        if first is not None and (admit is None or await admit(first)):  # the conversation's own key
            lease = first
            if client_gone(flow):
                self.pool.abandon(first)  # never sent: as if never chosen
                lease = ABANDONED
        if lease is None:
            lease = await self.line.acquire(deadline_ms, gone=lambda: client_gone(flow))
        if lease is ABANDONED:  # not sent, not counted
            answers.close(flow, "kimi-rotator: the client left while waiting for a key")
        elif isinstance(lease, Unavailable):
            comment = f"kimi-rotator: no key: {lease.shortage.value}"
            answers.give(flow, self._no_key_answer(lease), comment, streamed=streamed)
        else:
            self._send_with(flow, lease, deadline_ms, turn)

    def _send_with(self, flow: http.HTTPFlow, lease: Lease, deadline_ms: int, turn: Turn | None = None) -> None:
        record = self.ledger.open(
            FlowRecord(CLIENT, flow, lease.key, lease, deadline_ms, attempts=[attempt_note(lease)], turn=turn)
        )
        if turn is not None:
            self.affinity.went_to(turn, lease.key, self.clock.now_ms())
            flow.comment = f"kimi-rotator: {turn.note()}"
        self.ledger.put_key(record, unreadable=bodies.UNREADABLE)
        self.polls.last_request = flow.request
        self.notify.took_key()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = self.ledger.get(flow.id)
        if record is None:
            return
        self.ledger.mask(record)  # the request has gone upstream
        response = flow.response
        if response is None or record.kind is POLL:
            return
        # A success streams as it comes; an error stays buffered so its body can be read
        # and the request retried. Our own resends stay buffered too (the client gets
        # their answer whole), unless the client's answer is held: then a success streams
        # on to it (rotator.proxy.splice).
        if response.status_code < 400:
            if is_event_stream(response.headers):
                if record.kind is CLIENT:
                    response.stream = token_reading.stream_callable(flow) or True
                elif record.splice is not None:
                    response.stream = self.attempts.relay(record)
        elif record.kind is CLIENT:
            self._hold_refusal(record)

    def _hold_refusal(self, record: FlowRecord) -> None:
        """Hold an error answer that may lead to a retry, so that the retry's answer can
        stream to the client in its place (`_answer_held`)."""
        if (not self.settings.stream_retries or bodies.is_streamed(record.flow.request)
                or len(record.attempts) >= self._most_attempts()):
            return
        if held := splice.take_over(record.flow):
            record.splice = held
            self._background.start(self._answer_held(record, held))

    async def _answer_held(self, record: FlowRecord, held: Splice) -> None:
        """Judge a held refusal as `response` judges any answer: a retry then answers the
        client (rotator.proxy.attempts), anything else goes to it whole."""
        if not await held.refusal:
            return  # it ended otherwise: `response` or `error` took it
        flow = record.flow
        self.ledger.forget(flow.id)
        try:
            retrying = self._judge(record)
            if retrying is not None:
                return await retrying  # it answers the client (rotator.proxy.attempts)
        except Exception:  # the held client still gets the refusal, rather than nothing
            logger.exception("kimi-rotator: judging a held answer failed")
        if flow.response is not None:
            held.whole(flow.response)

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        record = self.ledger.forget(flow.id)
        if record is None or flow.response is None:
            return None
        if record.kind is POLL:
            self.polls.answered(record, flow.response)
            return None
        if record.splice is not None and record.kind is CLIENT:
            # Held, but the refusal came without a body and went the usual way.
            record.splice.release()
            record.splice = None
            flow.response.stream = False
        return self._judge(record)

    def _judge(self, record: FlowRecord) -> Awaitable[None] | None:
        """What the answer meant for its key; a client's refused request is retried
        (the awaitable), unless it can't be."""
        flow = record.flow
        response = flow.response
        lease = record.lease
        if lease is None or response is None:
            return None
        # Only error bodies say anything about the key; a success is never read.
        readable = not response.stream and response.status_code >= 400
        body = bodies.body_start(response) if readable else None
        if readable:
            bodies.mask_echoed_key(response, record.key, body)
        now = self.clock.now_ms()
        outcome = policy.classify(response.status_code, response.headers, body, now)
        usage = token_reading.spent(flow) if outcome.counts_as_success else None
        self.attempts.settle(record, outcome, now, usage)
        if outcome.window is not None:
            self.polls.after_refusal(record, outcome.window)
        if record.kind is CLIENT:
            if outcome.retry_elsewhere and not response.stream:
                if not bodies.is_streamed(flow.request):
                    return self.attempts.retry(record, lease, self._most_attempts())
                flow.comment += f"; {bodies.NOT_RESENT}"
            self.ledger.show_attempts_afresh(record)
        return None

    def _most_attempts(self) -> int:
        return retry.max_attempts(self.settings.max_attempts, len(self.pool.accounts))

    def error(self, flow: http.HTTPFlow) -> None:
        record = self.ledger.forget(flow.id)
        if record is not None and record.splice is not None and record.kind is CLIENT:
            record.splice.release()
        if record is not None and record.lease is not None:
            # A stream cut off counts what it said so far.
            self.attempts.failed(record, self.clock.now_ms(), token_reading.cut_short(flow))

    def client_disconnected(self, client: connection.Client) -> None:
        self.ledger.client_left(client)  # a resend for that client stops (rotator.proxy.attempts)

    def _no_key_answer(self, why: Unavailable) -> http.Response:
        assert self.sync is not None
        self.tally.answered_itself(why.shortage.value)
        self.notify.no_key(why, self.pool.accounts)
        return answers.no_key(
            why, self.pool.state, self.clock.now_ms(), self.sync.store, self.sync.problem
        )


def conversation_in(request: http.Request, streamed: bool) -> Conversation | None:
    """The conversation a request names (rotator.conversations.ids); an encoded or
    streamed body is not read: its headers only."""
    body = None if streamed else request.raw_content
    messages_api = bool(body) and shape_for_path(request.path) is Shape.ANTHROPIC
    return conversation_of(request.headers.fields, body or None, messages_api=messages_api)
