"""What a Kimi key looks like, and the one way a key (or anything shaped like one) is shown
and named."""

from __future__ import annotations

import functools
import re

KEY_PREFIX = "sk-kimi-"
_KEY_SHAPE = re.compile(r"sk-kimi-[A-Za-z0-9_\-]{8,}")
# Anything that might be a secret key in outside text: Kimi's form (even glued to a
# word, even a fragment) and other providers' sk- keys.
_KEY_LIKE = re.compile(r"sk-kimi-[A-Za-z0-9_\-]+|\bsk-[A-Za-z0-9_.\-]{8,}")


def is_kimi_key(value: str) -> bool:
    return _KEY_SHAPE.fullmatch(value) is not None


def key_problem(value: str) -> str | None:
    """What keeps `value` from being a Kimi API key, in words; None for a key."""
    if is_kimi_key(value):
        return None
    if not value.startswith(KEY_PREFIX):
        return f"not a Kimi API key (they start with {KEY_PREFIX})"
    rest = value[len(KEY_PREFIX):]
    if re.fullmatch(r"[A-Za-z0-9_\-]*", rest) is None:
        return "holds characters no Kimi API key has (a space, a line break, punctuation?)"
    return f"too short for a Kimi API key ({KEY_PREFIX} and at least 8 more characters; this has {len(rest)})"


@functools.lru_cache(maxsize=4096)  # asked several times for every request; keys are few
def mask_key(key: str) -> str:
    """`sk-kim…abcd`: enough to tell keys apart, never enough to use one.

    Always printable: a "key" from a hand-edited file may hold anything, and its ends
    are shown in logs and the terminal."""
    if len(key) <= 12:
        masked = "…" + key[-2:] if len(key) > 4 else "…"
    else:
        masked = f"{key[:6]}…{key[-4:]}"
    if masked.isprintable():
        return masked
    return "".join(c if c.isprintable() else "?" for c in masked)


def label(index: int, name: str, masked_key: str) -> str:
    """`[0] Personal (sk-kim…abcd)`: how a key is named in every message."""
    return f"[{index}] {name or 'unnamed'} ({masked_key})"


@functools.lru_cache(maxsize=4096)  # named in every flow's comment; keys are few
def key_label(index: int, name: str, key: str) -> str:
    return label(index, name, mask_key(key))


def mask_key_ascii(key: str) -> str:
    """`sk-kim...abcd`: the masked key where bytes may be shown raw (HTTP headers, which
    mitmproxy's console prints escaped: "…" would read as \\xe2\\x80\\xa6)."""
    return mask_key(key).replace("…", "...")


def looks_like_key(text: str) -> bool:
    return _KEY_LIKE.search(text) is not None


def scrub(text: str) -> str:
    """`text` with anything shaped like a key replaced by its masked form."""
    return _KEY_LIKE.sub(lambda m: mask_key(m.group(0)), text)
