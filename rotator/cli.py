"""`kimi-rotator` / `opencode-kimi`: manage the Kimi API keys in the accounts file.

The verbs, the list-keys layout and the file format are the TypeScript plugin's, so
either tool can manage the same file. Every change goes through
`storage.update_accounts` (lock, read, change, atomic write). A change is first tried
on a snapshot of the file, so a command that fails writes nothing and creates nothing.

Exit codes: 0 success, 1 the accounts file can't be read or written, 2 usage errors
(bad arguments, a key that isn't a Kimi key, an index out of range, ...).

Full keys are never printed: only `mask_key` forms appear in any output, and every
line written goes through a scrub that masks anything shaped like a Kimi key.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from rotator.health import HEALTH_SKIP_BELOW, effective_health
from rotator.keys import KEY_PREFIX, is_kimi_key, mask_key
from rotator.models import STRATEGIES, Account, AccountsFile
from rotator.reset_times import seconds_until
from rotator.storage import (
    AccountsFileError,
    read_accounts,
    resolve_accounts_path,
    update_accounts,
)
from rotator.storage import (
    is_readable_by_others as _is_readable_by_others,
)

DEFAULT_PROG = "kimi-rotator"
_KNOWN_PROGS = ("kimi-rotator", "opencode-kimi")
EXIT_OK = 0
EXIT_FILE = 1
EXIT_USAGE = 2

BAR_CELLS = 10
STATUS_ACTIVE = "✓ Active"
# Anything that looks like a key (or the start of one) is masked before it is printed.
_KEY_LIKE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_\-]+")
_INDEX_SHAPE = re.compile(r"[0-9]+")
# Fallbacks for terminals whose encoding can't show the glyphs.
_ASCII_GLYPHS = str.maketrans(
    {
        "●": "*",
        "○": "o",
        "█": "#",
        "░": "-",
        "✓": "+",
        "✗": "x",
        "⏳": "~",
        "⚠": "!",
        "…": "...",
        "—": "-",
    }
)


class CliError(Exception):
    """A usage problem reported as one line on stderr; nothing has been written."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _ParserExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, reporting errors as one line and never calling sys.exit itself."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            _emit(sys.stderr, message.rstrip("\n"))
        raise _ParserExit(status)


# ----------------------------------------------------------------------------- output


def _now_ms() -> int:
    return int(time.time() * 1000)


def scrub(text: str) -> str:
    """`text` with anything shaped like a Kimi key replaced by its masked form."""
    return _KEY_LIKE.sub(lambda m: mask_key(m.group(0)), text)


def _can_encode(stream: TextIO, text: str) -> bool:
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _emit(stream: TextIO, text: str) -> None:
    """Write one or more lines, masked, in a form the stream's encoding can carry."""
    text = scrub(text)
    if not _can_encode(stream, text):
        text = text.translate(_ASCII_GLYPHS)
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            text = text.encode(encoding, "replace").decode(encoding)
        except LookupError:
            text = text.encode("ascii", "replace").decode("ascii")
    stream.write(text + "\n")
    stream.flush()


def _out(text: str) -> None:
    _emit(sys.stdout, text)


def _err(text: str) -> None:
    _emit(sys.stderr, text)


def _prog_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    for suffix in (".exe", "-script.py", ".py"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name if name in _KNOWN_PROGS else DEFAULT_PROG


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def format_duration(ms: int) -> str:
    """`4m 12s`, `45s`, `2h 05m`, `3d 4h`; rounded up so it never shows 0s while waiting."""
    seconds = seconds_until(ms, 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def health_bar(health: int) -> str:
    filled = max(0, min(BAR_CELLS, int(health / 10 + 0.5)))  # round half up
    return "█" * filled + "░" * (BAR_CELLS - filled)


def account_status(account: Account, now_ms: int) -> str:
    if account.disabled_reason is not None:
        return f"✗ Disabled: {account.disabled_reason}"
    if account.rate_limit_reset_time > now_ms:
        left = format_duration(account.rate_limit_reset_time - now_ms)
        status = f"⏳ Cooling down (free in {left})"
        return f"{status}: {account.cooldown_reason}" if account.cooldown_reason else status
    if effective_health(account, now_ms) < HEALTH_SKIP_BELOW:
        return "⚠ Low health (skipped until it recovers)"
    return STATUS_ACTIVE


def _describe(index: int, account: Account) -> str:
    return f"[{index}] {account.name} ({mask_key(account.key)})"


# --------------------------------------------------------------------------- arguments


def parse_index(text: str) -> int:
    """A key's position in the file: a whole number, 0 or more."""
    if not _INDEX_SHAPE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"index must be a whole number 0 or more, got {text!r}")
    return int(text)


def _index_or_all(text: str) -> int | str:
    if text.lower() == "all":
        return "all"
    try:
        return parse_index(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected an index (a whole number 0 or more) or 'all', got {text!r}"
        ) from None


def _check_index(state: AccountsFile, index: int) -> Account:
    count = len(state.accounts)
    if count == 0:
        raise CliError(f"index {index} out of range (no keys configured)")
    if index >= count:
        raise CliError(f"index {index} out of range ({_plural(count, 'key')}: 0-{count - 1})")
    return state.accounts[index]


def _read_key(raw: str) -> str:
    if raw != "-":
        return raw.strip()
    if sys.stdin is None:
        raise CliError("no standard input to read the key from")
    if sys.stdin.isatty():
        try:
            return getpass.getpass("Kimi API key: ").strip()
        except EOFError:
            return ""
    return sys.stdin.readline().strip()


# ------------------------------------------------------------------------ the changes
# Each builds a function that changes the state in place and returns what to print,
# raising CliError (before changing anything) when the change can't be made.

Change = Callable[[AccountsFile], str]


def _add_key(key: str, name: str | None, now_ms: int) -> Change:
    def change(state: AccountsFile) -> str:
        existing = state.index_of(key)
        if existing is not None:
            raise CliError(
                f"key {mask_key(key)} is already in the list at "
                f"[{existing}] {state.accounts[existing].name}"
            )
        index = len(state.accounts)
        state.accounts.append(
            Account(key=key, name=name or f"Account {index + 1}", added_at=now_ms)
        )
        return f"Added {_describe(index, state.accounts[index])}. {_plural(index + 1, 'key')}."

    return change


def _remove_key(index: int) -> Change:
    def change(state: AccountsFile) -> str:
        removed = _check_index(state, index)
        del state.accounts[index]
        count = len(state.accounts)
        active = state.active_index
        if index < active:
            active -= 1
        state.active_index = min(active, count - 1) if count else 0
        message = f"Removed {_describe(index, removed)}. {_plural(count, 'key')} left."
        if count:
            now = state.accounts[state.active_index]
            message += f"\nActive key: {_describe(state.active_index, now)}"
        return message

    return change


def _rotate(now_ms: int) -> Change:
    def change(state: AccountsFile) -> str:
        count = len(state.accounts)
        if count == 0:
            raise CliError("no keys configured to rotate between; add one with add-key")
        current = state.active_index
        state.active_index = (current + 1) % count if 0 <= current < count else 0
        return _now_using("Rotated to", state, now_ms)

    return change


def _use_key(index: int, now_ms: int) -> Change:
    def change(state: AccountsFile) -> str:
        _check_index(state, index)
        state.active_index = index
        return _now_using("Now using", state, now_ms)

    return change


def _now_using(verb: str, state: AccountsFile, now_ms: int) -> str:
    index = state.active_index
    account = state.accounts[index]
    message = f"{verb} {_describe(index, account)}."
    status = account_status(account, now_ms)
    if status != STATUS_ACTIVE:
        message += f"\nNote: {status}"
    return message


def _set_strategy(strategy: str) -> Change:
    def change(state: AccountsFile) -> str:
        state.rotation_strategy = strategy  # type: ignore[assignment]  # checked by caller
        return f"Rotation strategy set to: {strategy}"

    return change


def _enable_key(index: int) -> Change:
    def change(state: AccountsFile) -> str:
        account = _check_index(state, index)
        was = account.disabled_reason
        account.disabled_reason = None
        account.consecutive_failures = 0
        if was is None:
            return f"{_describe(index, account)} was not disabled; it stays enabled."
        return f"Enabled {_describe(index, account)} (was disabled: {was})."

    return change


def _clear_limits(target: int | str) -> Change:
    def change(state: AccountsFile) -> str:
        if target == "all":
            chosen = list(range(len(state.accounts)))
        else:
            assert isinstance(target, int)
            _check_index(state, target)
            chosen = [target]
        for i in chosen:
            state.accounts[i].rate_limit_reset_time = 0
            state.accounts[i].cooldown_reason = None
            state.accounts[i].cooldown_level = 0  # next cooldown starts short again
        if target == "all":
            if not chosen:
                return "No keys configured; nothing to clear."
            return f"Cleared rate limits on all {_plural(len(chosen), 'key')}."
        return f"Cleared rate limits on {_describe(chosen[0], state.accounts[chosen[0]])}."

    return change


def _apply(path: Path, change: Change) -> str:
    """Try `change` on a snapshot (so errors write nothing), then make it for real."""
    change(read_accounts(path))
    result: list[str] = []

    def locked_change(state: AccountsFile) -> AccountsFile | None:
        before = state.to_json()
        result.append(change(state))
        return None if state.to_json() == before else state

    update_accounts(path, locked_change)
    return result[0]


# ------------------------------------------------------------------------------ listing


def _account_json(index: int, account: Account, active: int, now_ms: int) -> dict[str, object]:
    return {
        "index": index,
        "active": index == active,
        "name": account.name,
        "maskedKey": mask_key(account.key),
        "health": effective_health(account, now_ms),
        "totalRequests": account.total_requests,
        "successfulRequests": account.successful_requests,
        "rateLimitResetTime": account.rate_limit_reset_time,
        "cooling": account.rate_limit_reset_time > now_ms,
        "disabledReason": account.disabled_reason,
        "cooldownReason": account.cooldown_reason,
        "lastUsed": account.last_used,
        "status": account_status(account, now_ms),
    }


def _list_keys(path: Path, as_json: bool, prog: str, now_ms: int) -> None:
    state = read_accounts(path)
    if _is_readable_by_others(path):
        _err(
            f"{prog}: warning: {path} can be read by other users; "
            f"protect your keys with: chmod 600 {path}"
        )
    if as_json:
        doc = {
            "strategy": state.rotation_strategy,
            "activeIndex": state.active_index,
            "accounts": [
                _account_json(i, a, state.active_index, now_ms)
                for i, a in enumerate(state.accounts)
            ],
        }
        _out(json.dumps(doc, indent=2))
        return
    if not state.accounts:
        _out("No Kimi API keys configured.")
        _out(f"Add one with: {prog} add-key KEY [NAME]")
        return
    lines = [
        f"Kimi API Keys ({len(state.accounts)} total, strategy: {state.rotation_strategy}):",
        "",
    ]
    for i, account in enumerate(state.accounts):
        health = effective_health(account, now_ms)
        lines += [
            f"{'●' if i == state.active_index else '○'} [{i}] {account.name}",
            f"   Key: {mask_key(account.key)}",
            f"   Health: {health_bar(health)} {health}%",
            f"   Requests: {account.successful_requests}/{account.total_requests} successful",
            f"   Status: {account_status(account, now_ms)}",
            "",
        ]
    _out("\n".join(lines[:-1]))


# ------------------------------------------------------------------------------- parser


def build_parser(prog: str) -> argparse.ArgumentParser:
    # --accounts is accepted before or after the verb; SUPPRESS keeps a later absent
    # copy from overwriting one given earlier.
    common = _Parser(add_help=False)
    common.add_argument(
        "--accounts",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="accounts file (default: $KIMI_ROTATOR_ACCOUNTS, else the per-user config folder)",
    )
    parser = _Parser(
        prog=prog,
        parents=[common],
        description="Manage the Kimi API keys that the kimi-rotator proxy rotates between.",
        epilog="Exit codes: 0 ok, 1 the accounts file can't be read or written, 2 usage error.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, parents=[common], help=help_text, description=help_text)

    p = verb("add-key", "Add a Kimi API key to the pool.")
    p.add_argument("key", metavar="KEY", help="the key (sk-kimi-...), or - to read it from stdin")
    p.add_argument("name", metavar="NAME", nargs="?", help='a label (default "Account N")')

    p = verb("list-keys", "Show every key with its health, requests and status.")
    p.add_argument("--json", action="store_true", help="machine-readable output (keys masked)")

    p = verb("remove-key", "Remove the key at INDEX.")
    p.add_argument("index", metavar="INDEX", type=parse_index)

    verb("rotate", "Make the next key the active one.")

    p = verb("use-key", "Make the key at INDEX the active one.")
    p.add_argument("index", metavar="INDEX", type=parse_index)

    p = verb("set-strategy", "Choose how the proxy picks keys.")
    p.add_argument("strategy", metavar="|".join(STRATEGIES))

    p = verb("enable-key", "Re-enable a key that was disabled (e.g. after a 401).")
    p.add_argument("index", metavar="INDEX", type=parse_index)

    p = verb("clear-limits", "Forget the rate-limit cooldown of one key or all keys.")
    p.add_argument("target", metavar="INDEX|all", type=_index_or_all)
    return parser


def _run(args: argparse.Namespace, prog: str) -> int:
    path = resolve_accounts_path(getattr(args, "accounts", None))
    now_ms = _now_ms()
    verb = args.verb
    if verb == "list-keys":
        _list_keys(path, args.json, prog, now_ms)
        return EXIT_OK
    change: Change
    if verb == "add-key":
        key = _read_key(args.key)
        if not is_kimi_key(key):
            shown = f" (got {mask_key(key)})" if key else ""
            raise CliError(f"not a Kimi API key (they start with {KEY_PREFIX}){shown}")
        name = (args.name or "").strip() or None
        if name is not None and _KEY_LIKE.search(name):
            raise CliError("NAME looks like an API key; give the key first: add-key KEY [NAME]")
        change = _add_key(key, name, now_ms)
    elif verb == "remove-key":
        change = _remove_key(args.index)
    elif verb == "rotate":
        change = _rotate(now_ms)
    elif verb == "use-key":
        change = _use_key(args.index, now_ms)
    elif verb == "set-strategy":
        if args.strategy not in STRATEGIES:
            raise CliError(
                f"unknown strategy {args.strategy!r} (choose one of: {', '.join(STRATEGIES)})"
            )
        change = _set_strategy(args.strategy)
    elif verb == "enable-key":
        change = _enable_key(args.index)
    elif verb == "clear-limits":
        change = _clear_limits(args.target)
    else:  # pragma: no cover - argparse only accepts the verbs above
        raise CliError(f"unknown verb {verb!r}")
    _out(_apply(path, change))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    prog = _prog_name()
    parser = build_parser(prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        return _run(args, prog)
    except _ParserExit as e:
        return e.code
    except CliError as e:
        _err(f"{prog}: error: {e}")
        return e.code
    except AccountsFileError as e:
        _err(f"{prog}: error: {e}")
        return EXIT_FILE
    except KeyboardInterrupt:
        _err(f"{prog}: interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
