"""The save loop: a pool's changes go to its store about once an interval, and the
store's state (another process's changes included) comes back into the pool.

It knows the `StateStore` interface only. Stores block, so each call runs in a worker
thread, never on the proxy's event loop. A store that can't be read, written or locked
is reported once per distinct problem, as what it is; the pool keeps serving from its
last good state, keeps its changes for the next try (whatever a save failed on), and
says so once the store works again. What is odd in the store but usable (a key listed
twice, activeIndex out of range: `rotator.core.oddities`) is said once, when it appears.
A store that lost the pool (`PoolLost`: a Redis server restarted without its data) gets
it back from the pool's memory, its counts and this proxy's unsaved ones included, and
that is said loudly; a notice the store could not send the team (`untold`) is said once,
as is its return; changes a last save at exit could not keep are said, with how many.

A person's change made through the proxy (a mitmproxy command: `run_op`) is made at
once in the pool's memory, so the next request sees it, and saved as the CLI saves it
(`ops.run`: stamped, under the lock) by the next save, which starts at once. Until
the store has it, it is made again on every state adopted from the store, so a save
that was under way when it came can't undo it in memory, and a store that fails keeps
it pending for the next try.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rotator.admin import ops
from rotator.core import oddities
from rotator.core.background import Background
from rotator.core.log import ALERT
from rotator.core.merge import PoolChange
from rotator.core.models import AccountsFile
from rotator.pool.key_pool import KeyPool
from rotator.store import PoolLost, StateStore, StoreError

logger = logging.getLogger(__name__)
# Saves asked for by notices follow each other at most this often (a burst of cooldowns
# on several proxies must not turn into a save per notice).
SOON_GAP_S = 0.1


StoreHeard = Callable[[str, str | None], None]


class PoolSync:
    def __init__(
        self, store: StateStore, pool: KeyPool, interval_s: float, heard: StoreHeard | None = None
    ) -> None:
        self.store = store
        # Told when the store stops answering (its location, why) and when it answers
        # again (its location, None): the notifications of a team store.
        self._heard = heard
        self.pool = pool
        self.interval_s = interval_s
        self.problem: str | None = None
        self._problem_action = "read"
        self._notes: frozenset[str] = frozenset()
        self._untold: str | None = None  # why notices can't reach the team, as said
        self._task: asyncio.Task[None] | None = None
        self._saving: asyncio.Future[None] | None = None
        # A person's changes made in memory and not yet in the store, oldest first.
        self._pending_ops: list[ops.Op] = []
        self._one_save_at_a_time = asyncio.Lock()
        self._soon = Background()  # saves started now rather than at the interval
        self._soon_wanted = False  # a save asked by `soon` waits to start
        self._last_soon_s = float("-inf")  # when the last one started (the loop's clock)

    def load(self) -> AccountsFile | None:
        """Read the store at start (blocking; start-up and option changes only)."""
        try:
            state = self.store.load()
        except StoreError as e:
            # A warning, not an error: mitmdump exits on errors logged while starting,
            # and clients should rather be told what is wrong with the store.
            self._note_problem(e, logging.WARNING)
            return None
        self.problem = None
        self._say_notes(state)
        _say_events(self.pool.adopt(state))
        return state

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._save_forever())

    def run_op(self, op: ops.Op) -> str:
        """A person's change: made in the pool's memory now, saved in a worker thread by a
        save that starts now (`saved` awaits it). Returns what to tell the person;
        raises `ops.OpError`, changing nothing, if the change can't be made."""
        message = op(self.pool.state)
        self._pending_ops.append(op)
        _say_events(self._refresh_pool())
        self._soon.start(self._save_logged())
        return message

    async def saved(self) -> None:
        """Wait for the saves `run_op` started."""
        await self._soon.stop(cancel=False)

    def soon(self) -> None:
        """Save and read the store now, not at the next interval: another process says it
        changed (a shared store's notice). However many ask while one such save waits,
        it is one save, and they follow each other at most every `SOON_GAP_S`."""
        if self._soon_wanted:
            return
        self._soon_wanted = True
        self._soon.start(self._save_soon())

    async def _save_soon(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            wait_s = self._last_soon_s + SOON_GAP_S - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            async with self._one_save_at_a_time:
                self._soon_wanted = False  # a notice from now on needs a save after this one
                self._last_soon_s = loop.time()
                await self._save()
        except Exception:
            logger.exception("kimi-rotator: saving to %s failed", self.store.location)

    @property
    def pending_ops(self) -> int:
        """A person's changes the store does not have yet."""
        return len(self._pending_ops)

    def _refresh_pool(self) -> list[str]:
        # What the pool derives from its state (the in-flight caps a cooldown level sets,
        # Kimi's parallel limits, waiting requests) follows a change made in place:
        # adopting its own state, with no changes of its own on top to count twice.
        taken = self.pool.take_changes()
        try:
            return self.pool.adopt(self.pool.state)
        finally:
            self.pool.give_back(taken)

    async def _save_logged(self) -> None:
        try:
            await self.save_once()
        except Exception:
            logger.exception("kimi-rotator: saving to %s failed", self.store.location)

    async def stop(self) -> None:
        """Stop the loop, let a save under way finish, and save once more."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.saved()
        if self._saving is not None:
            # A save under way holds changes taken from the pool: let it finish.
            try:
                await self._saving
            except Exception:
                logger.exception("kimi-rotator: saving to %s failed", self.store.location)
            self._saving = None
        # Shutting down: a last save is what keeps the counts exact.
        await self.save_once()
        requests, changes = counted_requests(self.pool.changes), len(self._pending_ops)
        if self.pool.changes or changes:
            logger.error(
                "kimi-rotator: stopping with %s not saved to %s %s (%s): they are lost",
                unsaved_what(requests, changes), self.store.what, self.store.location,
                self.problem or "made after the last save",
            )

    async def _save_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            # Shielded: stopping the loop must not drop a save that holds taken changes.
            self._saving = asyncio.ensure_future(self.save_once())
            try:
                await asyncio.shield(self._saving)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a bad save stop future saves
                logger.exception("kimi-rotator: saving to %s failed", self.store.location)
            self._saving = None

    async def save_once(self) -> None:
        async with self._one_save_at_a_time:
            await self._save()

    async def _save(self) -> None:
        due = list(self._pending_ops)
        taken = self.pool.take_changes()
        try:
            refused, state = await asyncio.to_thread(self._write, due, taken)
        except PoolLost as e:
            self.pool.give_back(taken)
            await self._restore(e)
            return
        except StoreError as e:
            self.pool.give_back(taken)
            self._note_problem(e, logging.ERROR)
            return
        except Exception:
            # Not saved (a store writes last): keep the counts, and let the caller log it.
            # (Not on cancellation: the thread may still be saving them.)
            self.pool.give_back(taken)
            raise
        self._store_works()
        # Saved, or refused by the state as stored (the key was removed meanwhile).
        del self._pending_ops[: len(due)]
        for why in refused:
            logger.warning("kimi-rotator: a change made from mitmproxy was not saved: %s", why)
        if state is not None:
            self._adopt(state)

    async def _restore(self, lost: PoolLost) -> None:
        """Put the pool back from memory: every change this proxy made is in it (taken
        with it, so none is saved twice), and so is every person's change made here."""
        taken = self.pool.take_changes()
        memory = self.pool.state.model_copy(deep=True)
        keys, in_memory = len(memory.accounts), len(self._pending_ops)
        try:
            state = await asyncio.to_thread(self.store.restore, lambda stored: with_keys_added(memory, stored))
        except StoreError as e:
            self.pool.give_back(taken)
            self._note_problem(e, logging.ERROR)
            return
        except Exception:
            self.pool.give_back(taken)
            raise
        if state is None:  # another process put it back: ours go in as changes, next save
            self.pool.give_back(taken)
            return
        del self._pending_ops[:in_memory]
        self._store_works()
        logger.log(
            ALERT, "kimi-rotator: %s; put it back from this proxy's memory: %d key(s), with their counts",
            lost, keys,
        )
        self._adopt(state)

    def _store_works(self) -> None:
        """A save went through: a problem said before is said to be over, and a notice
        the store could not send (or can again) is said once."""
        if self.problem is not None:
            if self._problem_action == "read":
                logger.log(ALERT, "kimi-rotator: %s is readable again", self.store.location)
            else:
                logger.log(ALERT, "kimi-rotator: saving to %s works again", self.store.location)
            self.problem = None
            if self._heard is not None:
                self._heard(self.store.location, None)
        untold = self.store.untold
        if (untold is None) != (self._untold is None):
            if untold is not None:
                logger.warning(
                    "kimi-rotator: cannot tell the team of changes at %s: %s; other proxies see them at "
                    "their next save instead of at once (the README's ACL gives the channel)",
                    self.store.location, untold,
                )
            else:
                logger.log(ALERT, "kimi-rotator: changes are told to the team at %s again", self.store.location)
            self._untold = untold

    def _write(self, due: list[ops.Op], taken: PoolChange) -> tuple[list[str], AccountsFile | None]:
        """In a worker thread: a person's changes first, as the CLI makes them, then the
        proxy's own, which then can't override them (`merge`)."""
        refused = []
        for op in due:
            try:
                ops.run(self.store, op)
            except ops.OpError as e:
                refused.append(str(e))
        return refused, self.store.sync(taken)

    def _adopt(self, state: AccountsFile) -> None:
        self._say_notes(state)
        before = {a.key for a in self.pool.accounts}
        events = self.pool.adopt(state)
        if self._pending_ops:  # not in the store yet: made again on what it holds
            for op in self._pending_ops:
                try:
                    op(self.pool.state)
                except ops.OpError:
                    pass  # its key is gone; the save says so
            events += self._refresh_pool()
        _say_events(events)
        after = {a.key for a in state.accounts}
        if before != after:
            logger.log(
                ALERT, "kimi-rotator: accounts file changed: %d key(s) now (%d added, %d removed)",
                len(after), len(after - before), len(before - after),
            )

    def _say_notes(self, state: AccountsFile) -> None:
        notes = frozenset(oddities.notes(state))
        for note in sorted(notes - self._notes):
            logger.warning("kimi-rotator: %s: %s", self.store.location, note)
        self._notes = notes

    @property
    def problem_said(self) -> str | None:
        """The store's problem as the log said it (what it is, what the proxy does meanwhile), or None."""
        if self.problem is None:
            return None
        return problem_line(self._problem_action, self.problem, bool(self.pool.accounts), self.store.what)

    def _note_problem(self, error: StoreError, level: int) -> None:
        message = str(error)
        new = message != self.problem
        self.problem, self._problem_action = message, error.action
        if new:
            logger.log(level, "kimi-rotator: %s", self.problem_said)
            if self._heard is not None:
                self._heard(self.store.location, message)


def with_keys_added(memory: AccountsFile, stored: AccountsFile) -> AccountsFile:
    """The pool a proxy puts back into a store that lost it: its `memory`, and any key
    `stored` there since (a person who added one to the emptied store) that it lacks."""
    have = {account.key for account in memory.accounts}
    added = [account for account in stored.accounts if account.key not in have]
    return memory.model_copy(update={"accounts": [*memory.accounts, *added]}) if added else memory


def counted_requests(change: PoolChange) -> int:
    """How many requests `change` counts (over every key)."""
    return sum(key.fields["total_requests"].value for key in change.keys.values() if "total_requests" in key.fields)


def unsaved_what(requests: int, changes: int) -> str:
    parts = [f"this proxy's counts of {requests} request(s)" if requests else "this proxy's changes"]
    if changes:
        parts.append(f"{changes} change(s) made from mitmproxy")
    return " and ".join(parts)


def _say_events(events: list[str]) -> None:
    for event in events:
        logger.log(ALERT, "kimi-rotator: %s", event)


def problem_line(action: str, message: str, has_keys: bool, what: str = "the accounts file") -> str:
    """The one log line for a store (`what` it is) that failed to `action` ("read",
    "write", "lock")."""
    serving = "serving from the last good state" if has_keys else "no keys to serve"
    if action == "read":
        return f"cannot read {what} {message}; {serving} and not writing until it is fixed"
    verb = "lock" if action == "lock" else "write"
    return (
        f"cannot {verb} {what} {message}; {serving}, keeping this proxy's "
        "counts in memory and trying again at every save"
    )
