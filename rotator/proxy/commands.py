"""mitmproxy commands (kimi.status, kimi.use, ...) for the console and mitmweb: the CLI's
changes, made from inside a running proxy.

Each change is the CLI's own op (`rotator.admin.ops`), aimed at the key the person saw rather
than at an index, made at once in the pool's memory and saved like the CLI saves it
(`PoolSync.run_op`): stamped as a person's edit, so the proxy's older changes can't
override it at the next merge. A change's result is logged at ALERT (the status page's
timeline shows it); bad input raises `CommandError`, whose message the console and
mitmweb show. Keys appear masked only, names cleaned (`text.clean_line`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mitmproxy import command, ctx, exceptions
from mitmproxy.log import ALERT

from rotator.admin import ops
from rotator.conversations.pins import SessionView
from rotator.core.keys import mask_key
from rotator.core.key_view import KeyState, KeyView, format_duration, view_pool
from rotator.core.models import STRATEGIES
from rotator.core.text import clean_line, clean_lines
from rotator.store import cli_command

if TYPE_CHECKING:
    from rotator.proxy.addon import KimiRotator
    from rotator.sync.save_loop import PoolSync

logger = logging.getLogger(__name__)

LINE_MOST = 300
_INDEX = re.compile(r"[0-9]+")
NO_KEYS = "no Kimi API keys configured; add one with: "


def _one_paragraph(func: Callable[..., object]) -> Callable[..., object]:
    """mitmproxy wraps a command's docstring as written, so a wrapped line's indentation
    became a run of spaces in the console's and mitmweb's help."""
    func.__doc__ = " ".join((func.__doc__ or "").split())
    return func


class RotatorCommands:
    def __init__(self, rotator: KimiRotator) -> None:
        self.rotator = rotator

    # -- reading ---------------------------------------------------------------
    @command.command("kimi.status")
    @_one_paragraph
    def status(self) -> Sequence[str]:
        """One line per key: index, name, masked key, state and how long until it is free
        (in mitmweb, which shows a command's result as one line of JSON: a summary, and
        each key's line in the event log)."""
        now = self.rotator.clock.now_ms()
        views = view_pool(self.rotator.pool.state, now)
        lines = [status_line(view, now) for view in views]
        sync = self.rotator.sync
        if sync is not None and sync.problem_said is not None:  # why, before what it leaves
            lines.insert(0, clean_line(sync.problem_said, 2 * LINE_MOST))  # it names the store
        if not lines:
            add = "kimi-rotator add-key sk-kimi-…" if sync is None else cli_command(sync.store, "add-key sk-kimi-…")
            lines = [NO_KEYS + add]
        for line in lines:
            logger.info("kimi-rotator: %s", line)  # not ALERT: the timeline keeps changes
        if views and _in_mitmweb():
            return [pool_summary(views) + "; each key's line is in the event log"]
        return lines

    @command.command("kimi.usage")
    @_one_paragraph
    def usage(self) -> str:
        """Ask Kimi for every key's quota now (/coding/v1/usages); the readings arrive
        in the log and the status page."""
        polls = getattr(self.rotator, "polls", None)
        poll_now: Callable[[], int] | None = getattr(polls, "poll_now", None)
        if poll_now is None:
            raise exceptions.CommandError("kimi.usage: this proxy cannot poll quotas")
        started = poll_now()
        if started:
            return _said(f"asking Kimi for the quota of {ops.plural(started, 'key')}")
        return _said("no quota poll started (no key to ask, or every key's poll is under way)")

    @command.command("kimi.sessions")
    @_one_paragraph
    def sessions(self) -> Sequence[str]:
        """One line per live conversation (conversation affinity): its id shortened, the
        client, its key (masked), turns and moves, seconds since its last turn."""
        rotator = self.rotator
        if not rotator.settings.affinity:
            lines = ["conversation affinity is off (kimi_affinity)"]
        else:
            now = rotator.clock.now_ms()
            lines = [session_line(view, now) for view in rotator.pins.sessions(now, mask_key)]
            lines = lines or ["no live conversations"]
        for line in lines:
            logger.info("kimi-rotator: %s", line)
        return lines

    # -- changes (the CLI's verbs) ---------------------------------------------
    @command.command("kimi.rotate")
    @_one_paragraph
    def rotate(self) -> str:
        """Make the next key the active one (kimi-rotator rotate)."""
        state = self.rotator.pool.state
        if not state.accounts:
            raise exceptions.CommandError("kimi.rotate: no keys configured to rotate between")
        key = state.accounts[state.active_index].key
        return self._run("kimi.rotate", lambda now: ops.rotate_past(key, now))

    @command.command("kimi.use")
    @_one_paragraph
    def use(self, index: int) -> str:
        """Make the key at INDEX the active one (kimi-rotator use-key)."""
        key = self._key_at("kimi.use", index)
        return self._run("kimi.use", lambda now: ops.on_key(key, lambda i: ops.use_key(i, now)))

    @command.command("kimi.enable")
    @_one_paragraph
    def enable(self, index: int) -> str:
        """Re-enable the key at INDEX, disabled after a 401 or a ban (kimi-rotator enable-key)."""
        key = self._key_at("kimi.enable", index)
        return self._run("kimi.enable", lambda now: ops.on_key(key, lambda i: ops.enable_key(i, now)))

    @command.command("kimi.clear")
    @_one_paragraph
    def clear(self, target: str) -> str:
        """Forget the cooldowns (rate and billing limits) of the key at INDEX, or of every
        key with 'all' (kimi-rotator clear-limits)."""
        if target.strip().lower() == "all":
            return self._run("kimi.clear", lambda now: ops.clear_limits("all", now))
        if not _INDEX.fullmatch(target.strip()):
            raise exceptions.CommandError(
                f"kimi.clear: expected an index (a whole number 0 or more) or 'all', got {_quoted(target)}"
            )
        key = self._key_at("kimi.clear", int(target))
        return self._run("kimi.clear", lambda now: ops.on_key(key, lambda i: ops.clear_limits(i, now)))

    @command.command("kimi.strategy")
    @_one_paragraph
    def strategy(self, name: str) -> str:
        """Choose how keys are picked: round-robin, health-based or sticky
        (kimi-rotator set-strategy)."""
        if name not in STRATEGIES:
            raise exceptions.CommandError(
                f"kimi.strategy: unknown strategy {_quoted(name)} (choose one of: {', '.join(STRATEGIES)})"
            )
        return self._run("kimi.strategy", lambda now: ops.set_strategy(name, now))

    # -- helpers ---------------------------------------------------------------
    def _sync(self, verb: str) -> PoolSync:
        sync = self.rotator.sync
        if sync is None:
            raise exceptions.CommandError(f"{verb}: no accounts file is open yet")
        return sync

    def _key_at(self, verb: str, index: int) -> str:
        try:
            return ops.account_at(self.rotator.pool.state, index).key
        except ops.OpError as e:
            raise exceptions.CommandError(f"{verb}: {e}") from None

    def _run(self, verb: str, make: Callable[[int], ops.Op]) -> str:
        sync = self._sync(verb)
        try:
            message = sync.run_op(make(self.rotator.clock.now_ms()))
        except ops.OpError as e:
            raise exceptions.CommandError(f"{verb}: {e}") from None
        return _said(message)


def _in_mitmweb() -> bool:
    return type(ctx.master).__module__.startswith("mitmproxy.tools.web")


def pool_summary(views: Sequence[KeyView]) -> str:
    """`3 keys: 2 ready, 1 cooling; in use: [0] Personal`."""
    counts: dict[str, int] = {}
    for view in views:
        state = view.state.value.replace("_", " ")
        counts[state] = counts.get(state, 0) + 1
    in_use = next((f"; in use: [{v.index}] {v.name}" for v in views if v.active), "")
    said = ", ".join(f"{n} {state}" for state, n in counts.items())
    return clean_line(f"{ops.plural(len(views), 'key')}: {said}{in_use}", LINE_MOST)


def status_line(view: KeyView, now: int) -> str:
    """`● [0] Personal (sk-kim…abcd): cooling, free in 4m 12s (rate limited)`; the key the
    pool is on says `in use`."""
    state = view.state.value.replace("_", " ") + (" and in use" if view.active else "")
    line = f"{'●' if view.active else '○'} {view.label}: {state}"
    if view.state is KeyState.DISABLED:
        line += f" ({view.disabled_reason}); kimi.enable {view.index} to use it again"
    elif view.state is KeyState.COOLING:
        line += f", free in {format_duration(view.rate_limit_reset_time - now)}"
        if view.cooldown_reason:
            line += f" ({view.cooldown_reason})"
    else:
        line += f", health {view.health}%"
    return clean_line(line, LINE_MOST)


def session_line(view: SessionView, now: int) -> str:
    """`3f2a9c1e-7b4d… claude-code on sk-kim…abcd: 5 turns, 1 move, last 12s ago`."""
    moves = f", {ops.plural(view.moves, 'move')}" if view.moves else ""
    ago = format_duration(max(0, now - view.last_seen_ms))
    return clean_line(f"{view.id} {view.client} on {view.key}: {ops.plural(view.turns, 'turn')}{moves}, last {ago} ago", LINE_MOST)


def _said(message: str) -> str:
    text = clean_lines(message)
    logger.log(ALERT, "kimi-rotator: %s", text)
    return text


def _quoted(text: str) -> str:
    return repr(clean_line(text, 60))
