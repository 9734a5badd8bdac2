"""`kimi-rotator` / `opencode-kimi`: manage the Kimi API keys in the accounts file.

The verbs, the list-keys layout and the file format are the TypeScript plugin's, so
either tool can manage the same file. Each verb is one row of `VERBS`: its arguments
and the `rotator.ops` change it makes (or, for list-keys, what it shows). Changes go
through the store (lock, read, change, atomic write), first tried on a snapshot so a
command that fails writes nothing and creates nothing.

Exit codes: 0 success, 1 the accounts file can't be read or written (or, for `usage`,
some key's quota could not be read), 2 usage errors (bad arguments, a key that isn't a
Kimi key, an index out of range, ...).

Full keys are never printed: only masked forms appear in any output, and every line
written goes through `text.clean_lines`, which masks anything shaped like a key and
drops what a terminal would act on (escapes, controls, bidi overrides). Names given on
the command line are refused, not cleaned, when they hold such characters or are too
long: a person should know what they typed was not stored as typed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

from rotator import backup_cli, oddities, ops, usage_cli
from rotator.cli_help import help_text, synopsis
from rotator.clock import now_ms
from rotator.keys import KEY_PREFIX, is_kimi_key, looks_like_key, mask_key
from rotator.models import STRATEGIES
from rotator.status import as_json, list_block, stats_json, stats_page, view_pool
from rotator.terminal import emit
from rotator.text import NAME_MOST, refusal
from rotator.store import STORE_ENV, StateStore, StoreError, open_store
from rotator.store.file import FileStore, is_readable_by_others, resolve_accounts_path

DEFAULT_PROG = "kimi-rotator"
_KNOWN_PROGS = ("kimi-rotator", "opencode-kimi")
EXIT_OK = 0
EXIT_FILE = 1
EXIT_USAGE = 2

_INDEX_SHAPE = re.compile(r"[0-9]+")


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

    verb_parsers: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            emit(sys.stderr, message.rstrip("\n"))
        raise _ParserExit(status)


# ----------------------------------------------------------------------------- output


def _out(text: str) -> None:
    emit(sys.stdout, text)


def _err(text: str) -> None:
    emit(sys.stderr, text)


def _prog_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    for suffix in (".exe", "-script.py", ".py"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name if name in _KNOWN_PROGS else DEFAULT_PROG


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


# ------------------------------------------------------------------------------ verbs


@dataclass(frozen=True)
class Context:
    store: StateStore
    prog: str
    now_ms: int


def _add_key(args: argparse.Namespace, cx: Context) -> ops.Op:
    key = _read_key(args.key)
    if not is_kimi_key(key):
        shown = f" (got {mask_key(key)})" if key else ""
        raise CliError(f"not a Kimi API key (they start with {KEY_PREFIX}){shown}")
    return ops.add_key(key, _checked_name(args.name), cx.now_ms)


def _checked_name(raw: str | None) -> str | None:
    name = (raw or "").strip()
    if not name:
        return None
    problem = refusal(name, NAME_MOST)
    if problem is not None:
        raise CliError(f"NAME {problem}")
    if looks_like_key(name):
        raise CliError("NAME looks like an API key; give the key first: add-key KEY [NAME]")
    return name


def _key_target(text: str) -> int | str:
    """remove-key's TARGET: an index, else a name or masked key (`ops.names`)."""
    return parse_index(text) if _INDEX_SHAPE.fullmatch(text) else text


def _remove_key(args: argparse.Namespace, cx: Context) -> ops.Op:
    return ops.remove_key(_key_target(args.target), args.expect)


def _list_keys(args: argparse.Namespace, cx: Context) -> None:
    path = cx.store.location
    state = cx.store.read()
    if isinstance(cx.store, FileStore) and is_readable_by_others(cx.store.path):
        _err(f"{cx.prog}: warning: {path} can be read by other users; protect your keys with: chmod 600 {path}")
    for note in oddities.notes(state):
        _err(f"{cx.prog}: warning: {path}: {note}")
    views = view_pool(state, cx.now_ms)
    if args.json:
        doc = {
            "strategy": state.rotation_strategy,
            "activeIndex": state.active_index,
            "accounts": [as_json(view, cx.now_ms) for view in views],
        }
        _out(json.dumps(doc, indent=2))
        return
    if not views:
        _out("No Kimi API keys configured.")
        _out(f"Add one with: {cx.prog} add-key KEY [NAME]")
        return
    lines = [f"Kimi API Keys ({len(views)} total, strategy: {state.rotation_strategy}):"]
    for view in views:
        lines += ["", *list_block(view, cx.now_ms)]
    _out("\n".join(lines))


def _stats(args: argparse.Namespace, cx: Context) -> None:
    views = view_pool(cx.store.read(), cx.now_ms)
    if args.json:
        _out(json.dumps(stats_json(views, cx.now_ms), indent=2))
    else:
        _out(stats_page(views, cx.now_ms, f"{cx.prog} add-key KEY [NAME]"))


def _usage(args: argparse.Namespace, cx: Context) -> int:
    try:
        return usage_cli.run(args, cx.store, f"{cx.prog} add-key KEY [NAME]", now_ms, _out)
    except usage_cli.BaseUrlError as e:
        raise CliError(str(e)) from None


def _true_or_false(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r} (when true, resting keys"
                                         " regain health after each cooldown period)")
    return text == "true"


def _cooldown_minutes(text: str) -> int:
    if not _INDEX_SHAPE.fullmatch(text) or not 1 <= int(text) <= 1440:
        raise argparse.ArgumentTypeError(f"MINUTES must be a whole number from 1 to 1440, got {text!r} (the"
                                         " rest per +10 health after a rate limit; default 30)")
    return int(text)


def _help(args: argparse.Namespace, cx: Context) -> None:
    parser = build_parser(cx.prog)
    assert isinstance(parser, _Parser)
    rows = [(synopsis(parser.verb_parsers[verb.name], cx.prog), verb.help) for verb in VERBS]
    _out(help_text(cx.prog, rows))


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], object]
    # An op to run through the store, or None when `show` does the work (it may return
    # an exit code; None means success).
    make_op: Callable[[argparse.Namespace, Context], ops.Op] | None = None
    show: Callable[[argparse.Namespace, Context], int | None] | None = None


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _index_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX", type=parse_index)


def _remove_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="INDEX|NAME|KEY",
                        help="the key's index, its name, or its masked key (sk-kim...abcd) as list-keys shows")
    parser.add_argument("--expect", metavar="NAME|KEY",
                        help="remove nothing unless the key at INDEX is still this one")


def _add_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", metavar="KEY", help="the key (sk-kimi-...), or - to read it from stdin")
    parser.add_argument("name", metavar="NAME", nargs="?", help='a label (default "Account N")')


def _json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output (keys masked)")


VERBS: tuple[Verb, ...] = (
    Verb("add-key", "Add a Kimi API key to the pool.", _add_key_arguments, make_op=_add_key),
    Verb("list-keys", "Show every key with its health, requests and status.", _json_argument, show=_list_keys),
    Verb("remove-key", "Remove a key, named by its index, its name or its masked key.",
         _remove_key_arguments, make_op=_remove_key),
    Verb("rotate", "Make the next key the active one.", _no_arguments,
         make_op=lambda a, cx: ops.rotate(cx.now_ms)),
    Verb("use-key", "Make the key at INDEX the active one.", _index_argument,
         make_op=lambda a, cx: ops.use_key(a.index, cx.now_ms)),
    Verb("set-strategy", "Choose how the proxy picks keys.",
         lambda p: p.add_argument("strategy", metavar="|".join(STRATEGIES)),
         make_op=lambda a, cx: ops.set_strategy(a.strategy, cx.now_ms)),
    Verb("enable-key", "Re-enable a key that was disabled (e.g. after a 401).", _index_argument,
         make_op=lambda a, cx: ops.enable_key(a.index, cx.now_ms)),
    Verb("clear-limits", "Forget the rate-limit cooldown of one key or all keys.",
         lambda p: p.add_argument("target", metavar="INDEX|all", type=_index_or_all),
         make_op=lambda a, cx: ops.clear_limits(a.target, cx.now_ms)),
    Verb("export-keys", "Export every key, with its statistics, to an encrypted backup (the plugin's format).",
         backup_cli.export_arguments, show=lambda a, cx: _out(backup_cli.export_keys(a, cx.store, cx.now_ms))),
    Verb("import-keys", "Import keys from an encrypted backup or a plain accounts file (present keys skipped).",
         backup_cli.import_arguments, make_op=lambda a, cx: backup_cli.import_keys(a, cx.now_ms)),
    Verb("stats", "Show each key's requests, success rate, response times and recent days.",
         _json_argument, show=_stats),
    Verb("usage", "Ask Kimi for each key's quota: windows used and left, resets, parallel limit.",
         lambda p: usage_cli.arguments(p, parse_index), show=_usage),
    Verb("refresh-health", "Give +10 health to each key rested past the cooldown.", _no_arguments,
         make_op=lambda a, cx: ops.refresh_health(cx.now_ms)),
    Verb("set-auto-refresh", "Turn health recovery at rest on or off.",
         lambda p: p.add_argument("enabled", metavar="true|false", type=_true_or_false),
         make_op=lambda a, cx: ops.set_auto_refresh(a.enabled, cx.now_ms)),
    Verb("set-cooldown", "Set the minutes of rest per +10 health (1-1440, default 30).",
         lambda p: p.add_argument("minutes", metavar="MINUTES", type=_cooldown_minutes),
         make_op=lambda a, cx: ops.set_cooldown(a.minutes, cx.now_ms)),
    Verb("help", "Show this help message.", _no_arguments, show=_help),
)
_BY_NAME = {verb.name: verb for verb in VERBS}


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
    common.add_argument(
        "--store", metavar="URL", default=argparse.SUPPRESS,
        help=f"a team's pool on Redis: redis://[USER:PASSWORD@]HOST[:PORT][/DB] or rediss://... "
             f"(default: ${STORE_ENV}; empty: the accounts file)",
    )
    common.add_argument(
        "--store-prefix", metavar="PREFIX", default=argparse.SUPPRESS,
        help="the Redis keys' prefix, so several pools can share a server (default kimi-rotator:)",
    )
    parser = _Parser(
        prog=prog,
        parents=[common],
        description="Manage the Kimi API keys that the kimi-rotator proxy rotates between.",
        epilog="Exit codes: 0 ok, 1 the accounts file can't be read or written (usage: a key"
               " could not be read), 2 usage error.",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    subparsers.required = True
    parser.verb_parsers = {}
    for verb in VERBS:
        sub = parser.verb_parsers[verb.name] = subparsers.add_parser(
            verb.name, parents=[common], help=verb.help, description=verb.help
        )
        verb.arguments(sub)
    return parser


def _run(args: argparse.Namespace, prog: str) -> int:
    path: Path = resolve_accounts_path(getattr(args, "accounts", None))
    spec = getattr(args, "store", None)
    if spec is None:
        spec = os.environ.get(STORE_ENV, "")
    cx = Context(open_store(spec, path, getattr(args, "store_prefix", None)), prog, now_ms())
    verb = _BY_NAME[args.verb]
    if verb.show is not None:
        code = verb.show(args, cx)
        return EXIT_OK if code is None else code
    assert verb.make_op is not None
    # A person's change is stamped by the store's clock: a team's server, which every
    # machine agrees on whatever its own clock says (`merge`).
    server_ms = cx.store.server_time_ms()
    if server_ms is not None:
        cx = replace(cx, now_ms=server_ms)
    _out(ops.run(cx.store, verb.make_op(args, cx)))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    prog = _prog_name()
    parser = build_parser(prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        return _run(args, prog)
    except _ParserExit as e:
        return e.code
    except (CliError, ops.OpError) as e:
        _err(f"{prog}: error: {e}")
        return e.code if isinstance(e, CliError) else EXIT_USAGE
    except StoreError as e:
        _err(f"{prog}: error: {e}")
        return EXIT_FILE
    except KeyboardInterrupt:
        _err(f"{prog}: interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
