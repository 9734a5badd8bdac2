"""The pool's recent state changes, as the log shows them at ALERT: a key cooling,
disabled, recovered, a shared pause, the accounts file changing.

A logging handler on the package's logger keeps the newest lines with their time, so the
status page shows exactly what the log said, and nothing has to report twice.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from rotator.core.clock import now_ms
from rotator.core.log import ALERT
from rotator.core.text import clean_line

KEPT = 50
_PREFIX = "kimi-rotator: "


@dataclass(frozen=True, slots=True)
class Event:
    at_ms: int
    text: str


class Timeline(logging.Handler):
    """Attach with `attach()` (to the `rotator` logger), detach with `detach()`."""

    def __init__(self, kept: int = KEPT) -> None:
        super().__init__(level=ALERT)
        self.events: deque[Event] = deque(maxlen=kept)
        self._logger = logging.getLogger("rotator")

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno != ALERT:
            return
        try:
            text = record.getMessage()
        except Exception:  # a bad format must not break logging
            return
        self.events.append(Event(int(record.created * 1000) or now_ms(), clean_line(text.removeprefix(_PREFIX), 500)))

    def attach(self) -> None:
        if self not in self._logger.handlers:
            self._logger.addHandler(self)

    def detach(self) -> None:
        self._logger.removeHandler(self)

    def newest_first(self) -> list[Event]:
        return list(reversed(self.events))
