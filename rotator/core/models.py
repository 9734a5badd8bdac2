"""The accounts file, as the TypeScript plugin writes it.

Field names on disk are camelCase (`healthScore`, `rateLimitResetTime`, ...) so a file
written by the plugin loads unchanged and the plugin can read ours. Fields this project
adds are optional, and unknown fields are kept so a round trip loses nothing.
Times are milliseconds since the Unix epoch.

Text fields that people and Kimi fill in (names, reasons) are cleaned as they are read
(`rotator.core.text.clean_line`), so whatever reads a model (the proxy's logs, list-keys,
mitmweb) gets one printable line. Anything else is kept as it was, even half an emoji
(a lone UTF-16 surrogate), which is written back as the JSON escape it came as.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticSerializationError

from rotator.core.quota import QuotaReading
from rotator.core.text import NAME_MOST, REASON_MOST, clean_line

Strategy = Literal["round-robin", "health-based", "sticky"]
STRATEGIES: tuple[Strategy, ...] = ("round-robin", "health-based", "sticky")
DEFAULT_STRATEGY: Strategy = "health-based"
FILE_VERSION = 1
DEFAULT_COOLDOWN_MINUTES = 30
COOLDOWN_MINUTES_RANGE = (1, 1440)

_CONFIG = ConfigDict(
    alias_generator=to_camel,
    populate_by_name=True,
    extra="allow",
    validate_assignment=False,
)


class Account(BaseModel):
    model_config = _CONFIG

    key: str = Field(min_length=1)
    name: str = ""
    added_at: int = 0
    last_used: int = 0
    rate_limit_reset_time: int = 0
    # The plugin's billing-window deadline: a key is not used before the later of the two.
    billing_limit_reset_time: int = 0
    health_score: int = Field(default=100, ge=0, le=100)
    consecutive_failures: int = Field(default=0, ge=0)
    total_requests: int = Field(default=0, ge=0)
    successful_requests: int = Field(default=0, ge=0)
    # The plugin's: billing-limit answers in a row (a success resets it), the newest
    # response times in ms (sent to headers; rotator.core.stats keeps 100) and successes
    # per UTC day ("YYYY-MM-DD").
    consecutive_billing_limit_hits: int = Field(default=0, ge=0)
    response_times: list[int | float] = Field(default_factory=list)
    daily_requests: dict[str, int] = Field(default_factory=dict)
    # Added by this project (absent from the plugin's files, so all optional).
    # Resting recovery of health counts from here; 0 means "from lastUsed".
    health_rest_since: int = 0
    # Set when a key is disabled until a person re-enables it (revoked, banned).
    disabled_reason: str | None = None
    # Why the key is cooling, shown by list-keys.
    cooldown_reason: str | None = None
    # Cooldowns in a row with no success between them; each one lasts longer, and a
    # key above 0 gets a single request at a time until it succeeds (half-open).
    cooldown_level: int = Field(default=0, ge=0)
    # When a person last changed each field (by its name on disk): a proxy's older
    # change to that field does not override it (see rotator.core.merge).
    edited_at: dict[str, int] = Field(default_factory=dict)
    # The latest reading of Kimi's /usages for this key (rotator.core.quota).
    quota: QuotaReading | None = None
    # Tokens Kimi reported this key spent (rotator.tokens), named {input, output,
    # cacheRead, cacheWrite}: since the key was added, and per UTC day ("YYYY-MM-DD").
    tokens: dict[str, int] = Field(default_factory=dict)
    daily_tokens: dict[str, dict[str, int]] = Field(default_factory=dict)
    # In team mode, the same per proxy's member name (`kimi_member`) and UTC day.
    member_tokens: dict[str, dict[str, dict[str, int]]] = Field(default_factory=dict)

    @property
    def cooling_until(self) -> int:
        """When the key may serve again: the later of its rate-limit and billing deadlines."""
        billing = self.billing_limit_reset_time
        rate = self.rate_limit_reset_time
        return billing if billing > rate else rate

    @field_validator("name")
    @classmethod
    def _clean_name(cls, value: str) -> str:
        return clean_line(value, NAME_MOST)

    @field_validator("disabled_reason", "cooldown_reason")
    @classmethod
    def _clean_reason(cls, value: str | None) -> str | None:
        return None if value is None else clean_line(value, REASON_MOST)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogates(text: str) -> str:
    # In JSON text a raw character can only stand inside a string, where its \uXXXX
    # escape means the same: the result is valid UTF-8 and reads back unchanged.
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


class AccountsFile(BaseModel):
    model_config = _CONFIG

    version: Literal[1] = FILE_VERSION
    accounts: list[Account] = Field(default_factory=list)
    active_index: int = Field(default=0, ge=0)
    rotation_strategy: Strategy = DEFAULT_STRATEGY
    # The plugin's health refresh: whether resting keys recover, and the minutes of rest
    # each +10 takes (rotator.core.health).
    auto_refresh_health: bool = True
    health_refresh_cooldown_minutes: int | float = Field(
        default=DEFAULT_COOLDOWN_MINUTES, ge=COOLDOWN_MINUTES_RANGE[0], le=COOLDOWN_MINUTES_RANGE[1]
    )
    edited_at: dict[str, int] = Field(default_factory=dict)
    # An activeIndex past the last key, as read (then used as 0, what the proxy serves):
    # said by `rotator.core.oddities`; the file keeps it until the next write.
    _active_index_read: int | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _active_index_in_range(self) -> AccountsFile:
        if self.active_index and self.active_index >= len(self.accounts):
            if self.accounts:
                self._active_index_read = self.active_index
            self.active_index = 0
        return self

    @property
    def active_index_read(self) -> int | None:
        """The out-of-range activeIndex the file had, if it had one."""
        return self._active_index_read

    def to_json(self) -> str:
        try:
            return self.model_dump_json(by_alias=True, indent=2) + "\n"
        except PydanticSerializationError:
            # Only a lone surrogate (kept in an unknown field, or a key) gets here.
            document = self.model_dump(by_alias=True, mode="python")
            return _escape_surrogates(json.dumps(document, indent=2, ensure_ascii=False)) + "\n"

    def index_of(self, key: str) -> int | None:
        for i, account in enumerate(self.accounts):
            if account.key == key:
                return i
        return None

    def active_key(self) -> str | None:
        if 0 <= self.active_index < len(self.accounts):
            return self.accounts[self.active_index].key
        return None
