"""One attempt's hold on a key (`Lease`), and the keys a choice skips (`SkipKeys`): the
small records the pool hands out and reads on every request."""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import NamedTuple

from rotator.core.keys import key_label, mask_key
from rotator.core.models import Account


class Lease(NamedTuple):
    """One attempt's hold on a key, from choice to outcome (made once per request:
    a NamedTuple is the cheapest immutable record)."""

    key: str
    index: int
    name: str
    at_ms: int = 0  # when the key was chosen (a waiting request is sent only then)
    # Which entry of the key it was taken from (the pool numbers them): a key removed
    # and added again is a new entry, and the old one's answers count on neither.
    entry: int = 0

    @property
    def masked_key(self) -> str:
        return mask_key(self.key)

    @property
    def label(self) -> str:
        return key_label(self.index, self.name, self.key)


# Lease(...) with all five fields, without the Python-level __new__ a NamedTuple gets
# (the pool makes one a request): new_lease((key, index, name, at_ms, entry)).
new_lease = functools.partial(tuple.__new__, Lease)


class SkipKeys:
    """`index in skip` for choose_key, answered from a set of keys."""

    __slots__ = ("accounts", "keys")

    def __init__(self, accounts: list[Account], keys: Collection[str]) -> None:
        self.accounts = accounts
        self.keys = keys

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self.accounts[index].key in self.keys
