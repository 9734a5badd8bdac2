"""The proxy's parts around one pool, built in one place: the pool with its listeners (the
wait line, the team's caps and notices, and any the addon adds), the quota polls, the
attempts, and the save loop on a store; how they start and how they are let go.

The pool is made first (the parts need it) with a `PoolListeners` that the parts join
here, once; nothing is assigned into the pool from outside, and a part that stops
ignores what it hears. `KimiRotator` builds an `Assembly` at start-up and again when the
store changes (`kimi_accounts`, `kimi_store`), never per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rotator.conversations.pins import PinTable
from rotator.core.clock import Clock
from rotator.core.models import AccountsFile
from rotator.pool.affinity import Affinity
from rotator.pool.events import PoolListener, PoolListeners
from rotator.pool.key_pool import KeyPool
from rotator.pool.waitline import WaitLine
from rotator.proxy import upstream
from rotator.proxy.attempts import Attempts, NoKeyAnswer
from rotator.proxy.flows import FlowLedger
from rotator.proxy.options import Settings
from rotator.proxy.polls import QuotaPolls
from rotator.status.tally import Tally
from rotator.store import StateStore, cli_command
from rotator.sync.save_loop import PoolSync, StoreHeard
from rotator.sync.team_caps import TeamCaps
from rotator.sync.team_notices import TeamNotices
from rotator.sync.team_pins import SharedPins


@dataclass(slots=True, frozen=True)
class Shell:
    """What every assembly shares with the addon that builds it."""

    ledger: FlowLedger
    send: upstream.Send
    clock: Clock
    no_key_answer: NoKeyAnswer
    tally: Tally
    listeners: Sequence[PoolListener] = ()  # the addon's own listeners, told after the parts
    store_heard: StoreHeard | None = None  # told of a team store's outage and recovery
    # Live conversations' keys, kept across stores (event loop only).
    pins: PinTable = field(default_factory=PinTable)


@dataclass(slots=True, frozen=True)
class Assembly:
    pool: KeyPool
    line: WaitLine
    polls: QuotaPolls
    attempts: Attempts
    affinity: Affinity  # each conversation on one key (conversation affinity)
    sync: PoolSync | None = None
    team: TeamCaps | None = None  # team-wide in-flight caps, on a shared store
    notices: TeamNotices | None = None  # what the team's processes tell each other
    shared_pins: SharedPins | None = None  # conversation pins the team shares

    def start(self) -> None:
        """Start the store's parts (the polls start with the proxy: see the addon)."""
        if self.sync is not None:
            self.sync.start()
        for part in (self.team, self.notices, self.shared_pins):
            if part is not None:
                part.start()

    async def let_go(self) -> None:
        """Stop using the store: its team parts first (slots given back), then the last save."""
        if self.sync is None:
            return
        for part in (self.team, self.notices, self.shared_pins):
            if part is not None:
                await part.stop()
        await self.sync.stop()
        self.sync.store.close()


def assemble(
    shell: Shell, settings: Settings, store: StateStore | None = None, max_in_flight: int | None = None
) -> Assembly:
    """The parts around a new, empty pool (a store's `PoolSync.load` fills it); with
    `store`, the save loop and, on a shared store, the team's caps and notices."""
    listeners = PoolListeners()
    clock = shell.clock
    pool = KeyPool(
        AccountsFile(), settings.max_in_flight if max_in_flight is None else max_in_flight, clock, listeners
    )
    pool.quota_reserve_percent = settings.quota_reserve_percent
    sync = team = notices = shared_pins = None
    affinity = Affinity(pool, shell.pins)
    if store is not None:
        pool.cli = cli_command(store, "")  # its messages' advice names the store
        slots = store.team_slots(settings.slot_ttl_ms)
        team = None if slots is None else TeamCaps(pool, slots, clock)
        pool.member = None if team is None else settings.member  # tokens per member, in a team
        events = store.team_events()
        sync = PoolSync(store, pool, settings.flush_interval_s, None if events is None else shell.store_heard)
        notices = None if events is None else TeamNotices(events, pool, sync, team, clock)
        team_pins = store.team_pins()
        shared_pins = None if team_pins is None else SharedPins(team_pins, shell.pins, pool, clock)
        affinity.pinned = None if shared_pins is None else shared_pins.pinned
    line = WaitLine(pool, admit=None if team is None else team.admit)
    listeners.add(*(part for part in (line, team, notices, affinity) if part is not None), *shell.listeners)
    polls = QuotaPolls(shell.ledger, pool, shell.send, clock)
    polls.interval_s = settings.usage_interval_s
    attempts = Attempts(pool, line, shell.ledger, shell.send, clock, shell.no_key_answer, shell.tally, affinity)
    return Assembly(pool, line, polls, attempts, affinity, sync, team, notices, shared_pins)
