"""mitmproxy commands (kimi.status, kimi.use, ...) for the console and mitmweb."""

from __future__ import annotations

from typing import Any


class RotatorCommands:
    def __init__(self, rotator: Any) -> None:
        self.rotator = rotator
