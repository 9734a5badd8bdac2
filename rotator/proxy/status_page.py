"""The live status page, /status.json and /metrics, served on their own loopback port."""

from __future__ import annotations

from typing import Any


class StatusPage:
    def __init__(self, rotator: Any) -> None:
        self.rotator = rotator
