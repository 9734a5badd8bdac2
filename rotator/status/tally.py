"""What one running proxy has counted since it started, for its metrics and status page:
attempts per key by outcome, retries per key, and its own refusals by reason.

Counts live in memory only (the accounts file keeps the plugin's totals); a Prometheus
scrape reads them as counters, which restart at zero with the process as counters may.
Each count is one dict update, cheap enough for every answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class Tally:
    # (key, verdict value) -> attempts that ended so (rotator.core.policy.Verdict)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    # key -> attempts that were resends of a refused request
    retries: Counter[str] = field(default_factory=Counter)
    # reason -> answers the proxy gave itself instead of Kimi's (no key, refused client)
    refused: Counter[str] = field(default_factory=Counter)

    def attempt_ended(self, key: str, verdict: str) -> None:
        self.outcomes[key, verdict] += 1

    def retried(self, key: str) -> None:
        self.retries[key] += 1

    def answered_itself(self, reason: str) -> None:
        self.refused[reason] += 1

    def outcomes_of(self, key: str) -> dict[str, int]:
        return {verdict: n for (k, verdict), n in self.outcomes.items() if k == key}
