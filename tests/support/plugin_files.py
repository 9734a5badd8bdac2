"""Accounts files as the TypeScript plugin (opencode-kimi-rotator) writes them: every
field of its schema, nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.accounts import DAY, HOUR, NOW

# Keys whose masked form ends in "abcd", as the plugin's own examples show them.
PLUGIN_KEYS = [f"sk-kimi-FAKEplugin{i:014d}abcd" for i in range(3)]


def plugin_account(key: str, name: str, **fields: Any) -> dict[str, Any]:
    """An account exactly as the plugin writes one: all of its fields, nothing else."""
    return {
        "key": key, "name": name, "addedAt": NOW - 30 * DAY, "lastUsed": NOW - HOUR,
        "rateLimitResetTime": 0, "billingLimitResetTime": 0, "healthScore": 100,
        "consecutiveFailures": 0, "consecutiveBillingLimitHits": 0, "totalRequests": 0,
        "successfulRequests": 0, "responseTimes": [], "dailyRequests": {}, **fields,
    }


def plugin_file(path: Path, accounts: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    doc = {
        "version": 1, "accounts": accounts, "activeIndex": 0, "rotationStrategy": "health-based",
        "autoRefreshHealth": True, "healthRefreshCooldownMinutes": 30, **top,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return doc


def on_disk(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
