"""When a response says a key may be used again: its reset headers, read leniently.

Servers announce resets in several dialects; this module turns each into an absolute
deadline in ms since the epoch. A header that cannot be read is ignored, never fatal:
one odd value must not break the handling of an otherwise clear answer.

Rules
- A deadline must lie strictly after `now_ms` and no more than `MAX_AHEAD_MS` (31 days)
  after it. Anything else is a clock mistake or garbage, and trusting it could park a
  key for ever.
- Seconds are turned into ms rounding up, so a key never comes back early.
- `x-ratelimit-reset` is read by magnitude, because providers disagree on its unit:
  above 10**12 it is an epoch in ms, above 10**9 an epoch in seconds, otherwise seconds
  from now. 10**9 s is 2001-09-09, so no real epoch is smaller, and any
  seconds-from-now that large would exceed 31 days and be refused anyway.
- RFC 3339 stamps without an offset are taken as UTC: a server's local zone is
  unknowable, and UTC is what such stamps almost always mean.
- Several usable headers: the latest deadline wins, since the key is not usable until
  every limit it reports has reset. One exception: `retry-after-ms` is the precise form
  of `retry-after`, which is whole seconds rounded up; when both are present and within
  `RETRY_AFTER_AGREEMENT_MS` of each other, `retry-after` is dropped.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import ROUND_CEILING, Decimal, InvalidOperation

from rotator.core.clock import MS_PER_SECOND

MAX_AHEAD_MS = 31 * 24 * 60 * 60 * MS_PER_SECOND
EPOCH_SECONDS_ABOVE = 10**9
EPOCH_MS_ABOVE = 10**12
RETRY_AFTER_AGREEMENT_MS = 1000

RETRY_AFTER = "retry-after"
RETRY_AFTER_MS = "retry-after-ms"
X_RATELIMIT_RESET = "x-ratelimit-reset"
ANTHROPIC_RESET_HEADERS = (
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-reset",
)
_KNOWN = frozenset((RETRY_AFTER, RETRY_AFTER_MS, X_RATELIMIT_RESET, *ANTHROPIC_RESET_HEADERS))

# A plain decimal: no sign, exponent, underscores, "nan" or "inf", all of which
# float() would happily accept.
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
# Far beyond any real deadline (year ~33,700), small enough to stay a cheap integer.
_MS_CEILING = 10**15
# Longer than any real number; a megabyte of digits would overflow Decimal's exponent.
_MAX_NUMBER_CHARS = 40

_Parser = Callable[[str, int], int | None]


def later_deadline(a: int | None, b: int | None) -> int | None:
    """The later of two deadlines, None meaning "no deadline".

    A key already cooling keeps the later of its old and new deadlines, so a short
    answer (say a 429) cannot cut short a long one (an exhausted weekly window).
    """
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def reset_deadline_from_headers(headers: Mapping[str, str] | None, now_ms: int) -> int | None:
    """The latest usable deadline the headers announce, or None."""
    if not headers:
        return None
    try:
        values = _known_header_values(headers)
    except Exception:  # an exotic mapping that misbehaves must not break classification
        return None

    def latest(name: str, parse: _Parser) -> int | None:
        found: int | None = None
        for raw in values.get(name, ()):
            found = later_deadline(found, _usable(parse(raw, now_ms), now_ms))
        return found

    retry_after = latest(RETRY_AFTER, _parse_retry_after)
    retry_after_ms = latest(RETRY_AFTER_MS, _parse_retry_after_ms)
    if (
        retry_after is not None
        and retry_after_ms is not None
        and abs(retry_after - retry_after_ms) <= RETRY_AFTER_AGREEMENT_MS
    ):
        retry_after = None
    deadline = later_deadline(retry_after, retry_after_ms)
    deadline = later_deadline(deadline, latest(X_RATELIMIT_RESET, _parse_x_ratelimit_reset))
    for name in ANTHROPIC_RESET_HEADERS:
        deadline = later_deadline(deadline, latest(name, _parse_rfc3339))
    return deadline


# -- reading headers -------------------------------------------------------------------

def parse_reset_time(raw: object, now_ms: int) -> int | None:
    """A reset moment from a response body: an RFC 3339 time, or a number read as
    `x-ratelimit-reset` is (epoch ms, epoch seconds or seconds from now, by size).
    None if it is malformed, past, or implausibly far ahead."""
    text = _text(raw)
    deadline = _parse_x_ratelimit_reset(text, now_ms)
    if deadline is None:
        deadline = _parse_rfc3339(text, now_ms)
    return _usable(deadline, now_ms)


def _known_header_values(headers: Mapping[str, str]) -> dict[str, list[str]]:
    """Values of the headers this module reads, by lower-case name.

    mitmproxy's `Headers` is case-insensitive and joins repeated fields with ", " on
    lookup, which would garble a repeated HTTP date; `get_all` keeps them apart. A
    plain dict may spell names in any case, so names are lowered here.
    """
    get_all = getattr(headers, "get_all", None)
    found: dict[str, list[str]] = {}
    for name in headers:
        lowered = _text(name).strip().lower()
        if lowered not in _KNOWN:
            continue
        raw_values = get_all(name) if callable(get_all) else [headers[name]]
        found.setdefault(lowered, []).extend(_text(v) for v in raw_values)
    return found


def _text(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return str(value)


# -- parsing one value -------------------------------------------------------------------

def _usable(deadline: int | None, now_ms: int) -> int | None:
    if deadline is None or deadline <= now_ms or deadline - now_ms > MAX_AHEAD_MS:
        return None
    return deadline


def _decimal(raw: str) -> Decimal | None:
    text = raw.strip()
    if len(text) > _MAX_NUMBER_CHARS or not _DECIMAL.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        return None


def _ceil_ms(amount: Decimal, ms_per_unit: int) -> int | None:
    ms = amount * ms_per_unit
    # Bounded before conversion so a 10,000-digit value cannot become a huge integer.
    if ms > _MS_CEILING:
        return None
    return int(ms.to_integral_value(rounding=ROUND_CEILING))


def _parse_retry_after(raw: str, now_ms: int) -> int | None:
    seconds = _decimal(raw)
    if seconds is not None:
        delay = _ceil_ms(seconds, MS_PER_SECOND)
        return None if delay is None else now_ms + delay
    try:
        when = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return _datetime_ms(when)


def _parse_retry_after_ms(raw: str, now_ms: int) -> int | None:
    ms = _decimal(raw)
    if ms is None:
        return None
    delay = _ceil_ms(ms, 1)
    return None if delay is None else now_ms + delay


def _parse_x_ratelimit_reset(raw: str, now_ms: int) -> int | None:
    number = _decimal(raw)
    if number is None:
        return None
    if number > EPOCH_MS_ABOVE:
        return _ceil_ms(number, 1)
    if number > EPOCH_SECONDS_ABOVE:
        return _ceil_ms(number, MS_PER_SECOND)
    delay = _ceil_ms(number, MS_PER_SECOND)
    return None if delay is None else now_ms + delay


def _parse_rfc3339(raw: str, now_ms: int) -> int | None:
    # RFC 3339 allows lower-case "t" and "z", which fromisoformat refuses.
    text = raw.strip().upper()
    if not text:
        return None
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError, OverflowError):
        return None
    return _datetime_ms(when)


def _datetime_ms(when: datetime) -> int | None:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        # Integer arithmetic on timedeltas: exact, unlike timestamp()'s float.
        return -(-(when - _EPOCH) // _ONE_MS)
    except (OverflowError, ValueError):
        return None
