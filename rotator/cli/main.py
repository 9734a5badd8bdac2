"""`kimi-rotator` / `opencode-kimi`: manage the Kimi API keys in the accounts file.

The verbs, the list-keys layout and the file format are the TypeScript plugin's, so
either tool can manage the same file. Each verb is one row of `VERBS`: its arguments
and the `rotator.admin.ops` change it makes (or, for list-keys, what it shows). Changes go
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
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

from rotator.admin import ops
from rotator.cli import arg_types, export_import, launch, notify_check, usage
from rotator.cli.help import help_text, synopsis
from rotator.cli.render import as_json, by_member, by_member_page, list_block, stats_json, stats_page
from rotator.cli.terminal import emit, stdout_to_devnull
from rotator.core import oddities
from rotator.core.clock import now_ms
from rotator.core.key_view import view_pool
from rotator.core.keys import key_problem, looks_like_key, mask_key
from rotator.core.models import STRATEGIES
from rotator.core.text import NAME_MOST, refusal
from rotator.notify.channels import NOTIFY_ENV
from rotator.store import STORE_ENV, StateStore, StoreError, open_store
from rotator.store.file import FileStore, resolve_accounts_path
from rotator.store.safe_write import is_readable_by_others

DEFAULT_PROG = "kimi-rotator"
_KNOWN_PROGS = ("kimi-rotator", "opencode-kimi")
EXIT_OK = 0
EXIT_FILE = 1
EXIT_USAGE = 2
EXIT_CODES = ("Exit codes: 0 ok, 1 a file (the accounts file, a backup) can't be read or written, or"
              " (usage) a key's quota could not be read, 2 usage error.")


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
    problem = key_problem(key)
    if problem is not None:
        shown = f" (got {mask_key(key)})" if key else ""
        raise CliError(f"{problem}{shown}")
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


def _on_key(make: Callable[[int, int], ops.Op]) -> Callable[[argparse.Namespace, Context], ops.Op]:
    """make_op for a verb on one key (`make(index, now_ms)`), named as `arg_types.key_argument` takes it."""
    return lambda a, cx: ops.on_target(a.target, lambda index: make(index, cx.now_ms))


def _remove_key(args: argparse.Namespace, cx: Context) -> ops.Op:
    return ops.remove_key(arg_types.key_target(args.target), args.expect)


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
    lines = [f"Kimi API Keys ({len(views)} total, strategy: {state.rotation_strategy}; ● is the key in use):"]
    for view in views:
        lines += ["", *list_block(view, cx.now_ms)]
    _out("\n".join(lines))


def _stats(args: argparse.Namespace, cx: Context) -> None:
    views = view_pool(cx.store.read(), cx.now_ms)
    if args.by_member:
        _out(json.dumps({"members": by_member(views, cx.now_ms)}, indent=2) if args.json
             else by_member_page(views, cx.now_ms))
    elif args.json:
        _out(json.dumps(stats_json(views, cx.now_ms), indent=2))
    else:
        _out(stats_page(views, cx.now_ms, f"{cx.prog} add-key KEY [NAME]"))


def _usage(args: argparse.Namespace, cx: Context) -> int:
    try:
        return usage.run(args, cx.store, f"{cx.prog} add-key KEY [NAME]", now_ms, _out)
    except usage.BaseUrlError as e:
        raise CliError(str(e)) from None


def full_help(parser: argparse.ArgumentParser) -> str:
    """The one help page: `help`, `--help` and the bare command show it."""
    assert isinstance(parser, _Parser)
    rows = [(synopsis(parser.verb_parsers[verb.name], parser.prog), verb.help) for verb in VERBS]
    options = [(", ".join(a.option_strings) + (f" {a.metavar}" if a.metavar else ""), a.help or "")
               for a in parser._actions if a.option_strings]
    return help_text(parser.prog, rows, options, EXIT_CODES)


class _FullHelp(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show this help")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> NoReturn:
        _out(full_help(parser))
        raise _ParserExit(EXIT_OK)


def _help(args: argparse.Namespace, cx: Context) -> None:
    _out(full_help(build_parser(cx.prog)))


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


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    _json_argument(parser)
    parser.add_argument("--by-member", action="store_true",
                        help="tokens per team member (each proxy's kimi_member), the last 7 days")


VERBS: tuple[Verb, ...] = (
    Verb("add-key", "Add a Kimi API key to the pool.", _add_key_arguments, make_op=_add_key),
    Verb("list-keys", "Show every key with its health, requests and status.", _json_argument, show=_list_keys),
    Verb("remove-key", "Remove a key, named by its index, its name or its masked key.",
         _remove_key_arguments, make_op=_remove_key),
    Verb("rotate", "Make the next key the active one.", _no_arguments,
         make_op=lambda a, cx: ops.rotate(cx.now_ms)),
    Verb("use-key", "Make a key the active one.", arg_types.key_argument, make_op=_on_key(ops.use_key)),
    Verb("set-strategy", "Choose how the proxy picks keys.",
         lambda p: p.add_argument("strategy", metavar="|".join(STRATEGIES)),
         make_op=lambda a, cx: ops.set_strategy(a.strategy, cx.now_ms)),
    Verb("enable-key", "Re-enable a key that was disabled (e.g. after a 401).", arg_types.key_argument,
         make_op=_on_key(ops.enable_key)),
    Verb("clear-limits", "Forget the rate-limit cooldown of one key or all keys.",
         lambda p: p.add_argument("target", metavar="INDEX|NAME|KEY|all", type=arg_types.target_or_all),
         make_op=lambda a, cx: ops.clear_limits("all", cx.now_ms) if a.target == "all"
         else ops.on_target(a.target, lambda index: ops.clear_limits(index, cx.now_ms))),
    Verb("export-keys", "Export every key, with its statistics, to an encrypted backup (the plugin's format).",
         export_import.export_arguments, show=lambda a, cx: _out(export_import.export_keys(a, cx.store, cx.now_ms))),
    Verb("import-keys", "Import keys from an encrypted backup or a plain accounts file (present keys skipped).",
         export_import.import_arguments, make_op=lambda a, cx: export_import.import_keys(a, cx.now_ms)),
    Verb("stats", "Show each key's requests, success rate, response times, recent days and tokens.",
         _stats_arguments, show=_stats),
    Verb("usage", "Ask Kimi for each key's quota: windows used and left, resets, parallel limit.",
         lambda p: usage.arguments(p, arg_types.parse_index), show=_usage),
    Verb("refresh-health", "Give +10 health to each key rested past the cooldown.", _no_arguments,
         make_op=lambda a, cx: ops.refresh_health(cx.now_ms)),
    Verb("set-auto-refresh", "Turn health recovery at rest on or off.",
         lambda p: p.add_argument("enabled", metavar="true|false", type=arg_types.true_or_false),
         make_op=lambda a, cx: ops.set_auto_refresh(a.enabled, cx.now_ms)),
    Verb("set-cooldown", "Set the minutes of rest per +10 health (1-1440, default 30).",
         lambda p: p.add_argument("minutes", metavar="MINUTES", type=arg_types.cooldown_minutes),
         make_op=lambda a, cx: ops.set_cooldown(a.minutes, cx.now_ms)),
    Verb("proxy", "Start mitmdump with the addon; mitmdump's own options follow "
         "(e.g. --mode reverse:https://api.kimi.com -p 8080).",
         lambda p: p.add_argument("mitmdump_options", metavar="[MITMDUMP OPTIONS]", nargs=argparse.REMAINDER),
         show=lambda a, cx: launch.run_mitmdump(a.mitmdump_options)),
    Verb("notify-test", f"Send a test notification to the kimi_notify URLs (${NOTIFY_ENV}) or to URL.",
         notify_check.arguments, show=lambda a, cx: notify_check.run(a.url, _out, _err)),
    Verb("addon-path", "Print the addon script's path, for mitmdump, mitmweb or mitmproxy -s.", _no_arguments,
         show=lambda a, cx: _out(str(launch.ADDON_SCRIPT))),
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
        epilog=EXIT_CODES, add_help=False,
    )
    parser.add_argument("-h", "--help", action=_FullHelp)
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    subparsers.required = False  # none: the help page
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["proxy"]:  # the rest is mitmdump's, options and all
        return launch.run_mitmdump(argv[1:])
    try:
        args = parser.parse_args(argv)
        if args.verb is None:
            _out(full_help(parser))
            return EXIT_OK
        return _run(args, prog)
    except _ParserExit as e:
        return e.code
    except (CliError, ops.OpError) as e:
        _err(f"{prog}: error: {e}")
        return e.code if isinstance(e, CliError) else getattr(e, "exit_code", EXIT_USAGE)
    except StoreError as e:
        _err(f"{prog}: error: {e}")
        return EXIT_FILE
    except KeyboardInterrupt:
        _err(f"{prog}: interrupted")
        return 130
    except BrokenPipeError:  # `kimi-rotator usage | head -3`: the reader has all it wanted
        stdout_to_devnull()
        return EXIT_FILE


if __name__ == "__main__":
    raise SystemExit(main())
