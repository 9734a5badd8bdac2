"""One record per flow the addon handles, and the ledger that holds them.

A record says what the flow is (a client's request, our resend of one, our quota
poll), which key it carries and where, its hold on the pool, its deadline and its
attempts. Records live here, never in `flow.metadata`, which is display data saved with
the flow. Forgetting a record always masks its key first, whatever path got there. The
ledger also tells a resend when the client it is made for leaves (`until_client_leaves`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from mitmproxy.connection import Client, ConnectionState

from rotator.core.keys import label
from rotator.core.policy import Outcome, Window
from rotator.pool.affinity import Turn
from rotator.pool.lease import Lease
from rotator.proxy.headers import KeyPlacement, mask_sent_key, replace_client_key

if TYPE_CHECKING:
    from rotator.proxy.splice import Splice

METADATA_KEY = "kimi_rotator"


class FlowKind(enum.Enum):
    CLIENT = "client"  # a client's request, served with a pool key
    ATTEMPT = "attempt"  # our resend of a client's request on another key
    POLL = "poll"  # our /usages request for a key's quota


# The kinds by module-level name, for the hooks: a member looked up on its class costs
# several times a global's read, and the hooks test a flow's kind a handful of times.
CLIENT, ATTEMPT, POLL = FlowKind.CLIENT, FlowKind.ATTEMPT, FlowKind.POLL


@dataclass(slots=True, eq=False)
class FlowRecord:
    kind: FlowKind
    flow: http.HTTPFlow
    key: str  # the full key this flow carries, or will
    lease: Lease | None = None  # the pool's hold on the key, until the answer settles it
    deadline_ms: int = 0  # when waiting and retrying for this request stop
    placement: KeyPlacement | None = None  # where the key sits in the headers, until masked
    outcome: Outcome | None = None  # what the answer meant for the key
    attempts: list[dict[str, Any]] = field(default_factory=list)  # CLIENT: one note per attempt
    window: Window | None = None  # POLL after a window refusal: the window whose reset it asks
    turn: Turn | None = None  # CLIENT: its conversation's turn (conversation affinity)
    # CLIENT: its answer, held after a refusal; ATTEMPT: that of the client it resends for,
    # which a success streams to (rotator.proxy.splice).
    splice: Splice | None = None


def client_gone(flow: http.HTTPFlow) -> bool:
    """Whether the client has left (or the flow was killed) while the addon held it.

    Read, not awaited: while a hook of a flow is pending, mitmproxy queues the client's
    disconnection for the flow and runs no hook *of the flow* for it (its `error` comes
    after the hook returns, and the hook's task is not cancelled) in 11.0 and 12.x alike;
    what changes at once is the client connection's state (it can no longer be read
    from), and the connection's own `client_disconnected` hook runs at once too (see
    `FlowLedger.client_left`). An HTTP/2 client cancelling one stream is seen only when
    its connection closes.
    """
    return flow.error is not None or client_closed(flow)


def client_closed(flow: http.HTTPFlow) -> bool:
    """Whether the client's connection has closed (see `client_gone`)."""
    return not flow.client_conn.state & ConnectionState.CAN_READ


def attempt_note(lease: Lease) -> dict[str, Any]:
    return {"account": lease.name, "index": lease.index, "key": lease.masked_key}


def attempt_chain(notes: list[dict[str, Any]]) -> str:
    """The attempts a request made, in a person's words, for its flow's comment:
    `[0] Personal (sk-kim…abcd): HTTP 429: rate limited → [1] Work (sk-kim…wxyz): ok`."""
    return " → ".join(
        f"{label(note['index'], note['account'], note['key'])}: {note.get('reason') or 'no answer'}"
        for note in notes
    )


class FlowLedger:
    def __init__(self) -> None:
        self._records: dict[str, FlowRecord] = {}
        # Per client connection (its id): what waits for it to close (resends on its behalf).
        self._leaving: dict[str, set[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def open(self, record: FlowRecord) -> FlowRecord:
        self._records[record.flow.id] = record
        return record

    def get(self, flow_id: str) -> FlowRecord | None:
        return self._records.get(flow_id)

    def put_key(self, record: FlowRecord, *, bearer: bool = False, unreadable: frozenset[str] = frozenset()) -> None:
        """Put the record's key in its request, replacing the client's own (and take the
        `unreadable` codings out of what it accepts, in the same pass)."""
        record.placement = replace_client_key(
            record.flow.request.headers, record.key, bearer=bearer, unreadable=unreadable
        )

    def mask(self, record: FlowRecord) -> None:
        """Keep only the masked key in the flow (once its request has gone upstream)."""
        if record.placement is not None:
            mask_sent_key(record.flow.request.headers, record.key, record.placement)
            record.placement = None

    def forget(self, flow_id: str) -> FlowRecord | None:
        """Drop a flow's record, masking its key first."""
        record = self._records.pop(flow_id, None)
        if record is not None:
            self.mask(record)
        return record

    @contextmanager
    def until_client_leaves(self, client: Client) -> Iterator[asyncio.Future[None]]:
        """A future done once `client`'s connection closes (`client_left`), while the block runs."""
        leaving = asyncio.get_running_loop().create_future()
        waiting = self._leaving.setdefault(client.id, set())
        waiting.add(leaving)
        try:
            yield leaving
        finally:
            waiting.discard(leaving)
            if not waiting and self._leaving.get(client.id) is waiting:
                del self._leaving[client.id]
            leaving.cancel()

    def client_left(self, client: Client) -> None:
        """mitmproxy's `client_disconnected`: it comes as the connection closes, even while
        a hook of one of its flows (a retry) is pending."""
        for leaving in self._leaving.pop(client.id, ()):
            if not leaving.done():
                leaving.set_result(None)

    def mask_all(self) -> None:
        """At shutdown: flows still in flight are saved as they are, so mask them now."""
        for record in self._records.values():
            self.mask(record)

    def show_attempts_afresh(self, record: FlowRecord) -> None:
        """`show_attempts` for a client's flow once it is answered. A replayed saved flow
        arrives with its old attempts in its metadata: the record's list replaces them."""
        record.flow.metadata[METADATA_KEY] = {"attempts": list(map(dict, record.attempts))}  # copies, in C

    def show_attempts(self, record: FlowRecord) -> None:
        """Copy the attempts into the flow's metadata, for mitmweb and saved flows."""
        shown = record.flow.metadata.setdefault(METADATA_KEY, {})
        shown["attempts"] = [dict(note) for note in record.attempts]
