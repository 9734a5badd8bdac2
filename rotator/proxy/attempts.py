"""How one attempt on a key ends, and the attempts that follow a refusal.

`settle` ends an attempt's hold on its key with what the answer meant (the pool counts
it, the flow shows it); `retry` resends a refused client request on other keys, each
resend a flow of its own, within the request's one deadline, and stops a resend whose
client leaves. When the client's answer was held (rotator.proxy.splice), a resend's
streamed success goes on to the client event by event (`Relay`); any other last answer
goes whole. The addon's hooks call these; nothing here reads options or the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from mitmproxy import http
from mitmproxy.log import ALERT

from rotator.core import policy, stats
from rotator.core.clock import Clock
from rotator.pool.affinity import Affinity
from rotator.pool.key_pool import KeyPool
from rotator.pool.lease import Lease
from rotator.proxy import answers, retry, token_reading, upstream
from rotator.proxy.flows import (
    ATTEMPT,
    CLIENT,
    METADATA_KEY,
    FlowLedger,
    FlowRecord,
    attempt_chain,
    attempt_note,
    client_closed,
    client_gone,
)
from rotator.core.strategies import Unavailable
from rotator.pool.waitline import ABANDONED, Abandoned, WaitLine
from rotator.proxy.splice import Splice
from rotator.proxy.token_reading import StreamReader
from rotator.status.tally import Tally
from rotator.tokens import Usage
from rotator.tokens import shown as shown_tokens

logger = logging.getLogger(__name__)

NoKeyAnswer = Callable[[Unavailable], http.Response]


class Relay:
    """A resend's `response.stream` when its client's answer is held: each chunk, read
    for tokens (`reader`), goes on to the client; the resend's own flow keeps none."""

    __slots__ = ("reader", "splice")

    def __init__(self, reader: StreamReader | None, splice: Splice) -> None:
        self.reader = reader
        self.splice = splice

    def __call__(self, chunk: bytes) -> bytes:
        if self.reader is not None:
            self.reader(chunk)
        self.splice.data(chunk)
        return b""


class Attempts:
    def __init__(
        self, pool: KeyPool, line: WaitLine, ledger: FlowLedger, send: upstream.Send, clock: Clock,
        no_key_answer: NoKeyAnswer, tally: Tally, affinity: Affinity | None = None,
    ) -> None:
        self.affinity = affinity  # where a conversation's turn went is told to it
        self.pool = pool
        self.line = line
        self.ledger = ledger
        self.send = send
        self.clock = clock
        self.no_key_answer = no_key_answer
        self.tally = tally

    def settle(self, record: FlowRecord, outcome: policy.Outcome, now: int, usage: Usage | None = None) -> None:
        """End the record's hold on its key with what the answer meant, and show it (with
        the tokens the answer spent, when it said)."""
        lease = record.lease
        assert lease is not None
        record.lease = None
        record.outcome = outcome
        took_ms = None
        response = record.flow.response
        if outcome.counts_as_success and response is not None:
            # From sending the request (read whole, or its key chosen after a wait;
            # resends are stamped when sent) to the answer's headers, as the plugin measures.
            request = record.flow.request
            took_ms = stats.response_ms(
                request.timestamp_end or request.timestamp_start, response.timestamp_start, lease.at_ms
            )
        if usage is not None and record.turn is not None and self.affinity is not None:
            self.affinity.spent(record.turn, usage)
        event = self.pool.release(lease, outcome, now, took_ms, usage)
        if event:
            logger.log(ALERT, "kimi-rotator: %s", event)
        verdict = outcome.verdict._value_  # `.value` is a descriptor: two Python calls
        self.tally.attempt_ended(lease.key, verdict)
        note = record.attempts[-1]
        note["outcome"] = verdict
        note["reason"] = outcome.reason
        spent = ""
        if usage is not None:
            note["tokens"] = usage.as_fields()
            spent = f" · {shown_tokens.note(usage)}"
        if record.kind is ATTEMPT:
            self.ledger.show_attempts(record)
        record.flow.comment = f"kimi-rotator: {lease.label} → {verdict}{spent}" + turn_note(record)

    def failed(self, record: FlowRecord, now: int, usage: Usage | None = None) -> None:
        """The attempt's flow ended with an error (no answer, or one cut off): settled as
        a connection error, or as the client's leaving."""
        flow = record.flow
        message = flow.error.msg if flow.error else "connection failed"
        answered = flow.response.status_code if flow.response is not None else None
        # Our own resends carry a copy of the client's connection, closed: only a client's
        # own flow says whether its client left.
        client_left = record.kind is CLIENT and client_closed(flow)
        self.settle(record, policy.classify_connection_error(message, now, answered, client_left=client_left), now, usage)
        if record.kind is CLIENT:
            self.ledger.show_attempts_afresh(record)

    def relay(self, attempt: FlowRecord) -> Relay:
        """For a resend's success that streams (`responseheaders`) while its client's
        answer is held: the client gets its status and headers now, its events as they come."""
        splice = attempt.splice
        response = attempt.flow.response
        assert splice is not None and response is not None
        splice.start(response.copy())
        return Relay(token_reading.stream_reader(attempt.flow), splice)

    async def retry(self, client: FlowRecord, failed: Lease, most_attempts: int) -> None:
        """Resend on other keys; the client sees only the last answer. Each attempt is
        counted on its own key and listed in the client flow's metadata."""
        last: list[policy.Outcome] = []

        async def send(lease: Lease) -> policy.Outcome:
            outcome = await self._resend(client, lease)
            last.append(outcome)
            return outcome

        try:
            why = await self._retry(client, failed, most_attempts, send)
        except Exception as e:  # a held client must get an answer, whatever broke
            if client.splice is None:
                raise
            logger.exception("kimi-rotator: retrying on another key failed")
            why = None
            client.flow.response = answers.for_request(client.flow.request, answers.resend_failed(str(e) or type(e).__name__))
        if client.splice is not None:
            _finish(client.splice, client.flow, why, last[-1] if last else None)

    async def _retry(
        self, client: FlowRecord, failed: Lease, most_attempts: int,
        send: Callable[[Lease], Awaitable[policy.Outcome]],
    ) -> Unavailable | Abandoned | None:
        why = await retry.retry_elsewhere(
            self.line, send,
            tried={failed.key},
            attempts_made=len(client.attempts),
            most_attempts=most_attempts,
            deadline_ms=client.deadline_ms,
            gone=lambda: client_gone(client.flow),
        )
        if why is ABANDONED:
            client.flow.comment += "; the client left: not retried"
        elif why is not None:
            client.flow.response = answers.for_request(client.flow.request, self.no_key_answer(why))
            client.flow.comment += f"; no other key: {why.shortage.value}"
        self.ledger.show_attempts_afresh(client)
        return why

    async def _resend(self, client: FlowRecord, lease: Lease) -> policy.Outcome:
        flow = client.flow
        copy = upstream.copy_to_resend(flow)
        copy.metadata[METADATA_KEY] = {"retry_of": flow.id}
        if client.turn is not None and self.affinity is not None:
            self.affinity.went_to(client.turn, lease.key, self.clock.now_ms())
        self.tally.retried(lease.key)
        attempt = self.ledger.open(FlowRecord(ATTEMPT, copy, lease.key, lease, client.deadline_ms))
        attempt.splice = client.splice
        attempt.attempts.append(attempt_note(lease))
        detail = "no answer"
        left = False
        try:
            left = await self._send_unless_client_leaves(flow, attempt)
        except Exception as e:  # a failed resend must not take the client's answer with it
            logger.exception("kimi-rotator: resending on another key failed")
            detail = str(e) or type(e).__name__
        finally:
            self.ledger.forget(copy.id)  # masks the key, whatever happened
        if attempt.lease is not None:  # no answer and no error reached the hooks
            now = self.clock.now_ms()
            self.settle(attempt, policy.classify_connection_error(detail, now), now)
        assert attempt.outcome is not None
        client.attempts.extend(attempt.attempts)
        # The whole chain, not the last attempt only: mitmweb shows this one flow to a person.
        shown = f"kimi-rotator: {attempt_chain(client.attempts)}"
        if left:  # nobody to answer
            answers.close(flow, f"{shown}; the client left: the resend was stopped")
        else:
            streamed = client.splice is not None and client.splice.started
            answers.take_resent(flow, copy, detail, answer=not streamed)
            tokens = Usage.from_fields(attempt.attempts[-1].get("tokens")) if attempt.attempts else None
            if tokens is not None and client.turn is not None and self.affinity is not None:
                self.affinity.spent(client.turn, tokens)  # the resend's answer is the turn's
            flow.comment = (shown if tokens is None else f"{shown} · {shown_tokens.note(tokens)}") + turn_note(client)
        return attempt.outcome

    async def _send_unless_client_leaves(self, flow: http.HTTPFlow, attempt: FlowRecord) -> bool:
        """Send the attempt; True if the client's connection closed first. Then the
        resend is stopped (its connection to Kimi closed) and, unless its answer had
        come, settled as the client's leaving: its slot free at once, nothing counted
        for or against the key. Told by mitmproxy's `client_disconnected`, not polled."""
        sending = asyncio.ensure_future(self.send(attempt.flow))
        with self.ledger.until_client_leaves(flow.client_conn) as leaving:
            try:
                await asyncio.wait((sending, leaving), return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                sending.cancel()
                raise
        if sending.done():
            sending.result()  # what the send raised, if anything
            return False
        if attempt.lease is not None:
            # An answer that had begun streaming to the client counts as the key's success
            # (as a first attempt's does), with what it had spent.
            now = self.clock.now_ms()
            answer = attempt.flow.response
            outcome = policy.classify_connection_error(
                "the client left during a resend", now,
                answer.status_code if answer is not None else None, client_left=True,
            )
            self.settle(attempt, outcome, now, token_reading.cut_short(attempt.flow) if outcome.counts_as_success else None)
        self.ledger.forget(attempt.flow.id)  # before the stopped flow's error hook runs
        sending.cancel()
        await asyncio.wait((sending,))
        return True


def _finish(splice: Splice, flow: http.HTTPFlow, why: Unavailable | Abandoned | None,
            last: policy.Outcome | None) -> None:
    """Answer a held client once its retries are over: end the answer that streamed (or
    break it off, if the resend's stream broke), else send the client flow's answer whole."""
    if why is ABANDONED or splice.closed:
        return  # nobody to answer
    if splice.started:
        if last is not None and last.counts_as_success:
            splice.end()
        else:
            splice.abort(f"the retried answer broke off: {last.reason if last else 'no answer'}")
    elif flow.response is not None:
        splice.whole(flow.response)


def turn_note(record: FlowRecord) -> str:
    """What the flow comment adds of the request's conversation: `; conversation
    3f2a… (claude-code) pinned` (or new, moved), or nothing."""
    return "" if record.turn is None else f"; {record.turn.note()}"
