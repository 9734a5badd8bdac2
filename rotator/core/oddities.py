"""What is odd in an accounts file but still usable: how the pool treats it, and the line
that tells the user. Nothing here changes the user's entries: they are their data.

- A key listed more than once is one key: its first entry. Later entries are kept as
  they are, never counted and never chosen (the pool sees them as disabled).
- An `activeIndex` past the last key is read as 0 (see `AccountsFile`); the file keeps
  the user's value until the next write.
- A key holding anything but printable ASCII (a space, a line break, a control or
  non-ASCII character: a hand edit or a paste gone wrong) is never sent: it could not be
  a Kimi key, and a line break in it would inject headers into the request. The pool
  sees it as disabled until the user fixes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rotator.core.keys import mask_key
from rotator.core.models import Account, AccountsFile


_SENDABLE_KEY = re.compile(r"[!-~]+")  # printable ASCII, no space: what a header value may carry
UNSENDABLE = "its key holds spaces, line breaks or other characters no key has; fix it in the file"


def is_sendable(key: str) -> bool:
    return _SENDABLE_KEY.fullmatch(key) is not None


def first_index_by_key(accounts: Sequence[Account]) -> dict[str, int]:
    """Each key's index: its first entry."""
    index: dict[str, int] = {}
    for i, account in enumerate(accounts):
        index.setdefault(account.key, i)
    return index


def duplicates(accounts: Sequence[Account]) -> dict[int, int]:
    """Index of each later entry of a key listed more than once -> its first entry."""
    first = first_index_by_key(accounts)
    return {i: first[a.key] for i, a in enumerate(accounts) if first[a.key] != i}


def in_use(state: AccountsFile) -> AccountsFile:
    """The state a pool serves from: `state` itself unless a key is listed twice or
    cannot be sent; then a copy in which each later entry and each unsendable key is
    disabled (a copy of the entry too: the file's is left alone), and an activeIndex on
    a later entry moves to its first entry."""
    later = duplicates(state.accounts)
    unsendable = [i for i, account in enumerate(state.accounts) if not is_sendable(account.key)]
    if not later and not unsendable:
        return state
    accounts = list(state.accounts)
    for i, first in later.items():
        accounts[i] = accounts[i].model_copy(update={"disabled_reason": f"duplicate of [{first}]; not used"})
    for i in unsendable:
        accounts[i] = accounts[i].model_copy(update={"disabled_reason": UNSENDABLE})
    view = state.model_copy(update={"accounts": accounts})
    view.active_index = later.get(view.active_index, view.active_index)
    return view


def notes(state: AccountsFile) -> list[str]:
    """One line per oddity in `state`, for the CLI (as a warning) and the proxy's log."""
    found: list[str] = []
    read_index = state.active_index_read
    if read_index is not None:
        found.append(
            f"activeIndex {read_index} is out of range ({len(state.accounts)} keys); key [0] is the "
            "active one until another is chosen (use-key, rotate)"
        )
    for i, account in enumerate(state.accounts):
        if not is_sendable(account.key):
            found.append(f"key [{i}] ({mask_key(account.key)}) is never used: {UNSENDABLE}")
    by_first: dict[int, list[int]] = {}
    for later, first in duplicates(state.accounts).items():
        by_first.setdefault(first, []).append(later)
    for first, later_ones in by_first.items():
        listed = ", ".join(f"[{i}]" for i in [first, *later_ones])
        removes = " then ".join(f"remove-key {i}" for i in reversed(later_ones))
        found.append(
            f"key {mask_key(state.accounts[first].key)} is listed {len(later_ones) + 1} times ({listed}); "
            f"only [{first}] is used and counted, the others are left as they are "
            f"(to remove them: kimi-rotator {removes})"
        )
    return found
