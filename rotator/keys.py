"""What a Kimi key looks like, and how it may be shown to a person."""

from __future__ import annotations

import re

KEY_PREFIX = "sk-kimi-"
_KEY_SHAPE = re.compile(r"sk-kimi-[A-Za-z0-9_\-]{8,}")


def is_kimi_key(value: str) -> bool:
    return _KEY_SHAPE.fullmatch(value) is not None


def mask_key(key: str) -> str:
    """`sk-kim…abcd`: enough to tell keys apart, never enough to use one."""
    if len(key) <= 12:
        return "…" + key[-2:] if len(key) > 4 else "…"
    return f"{key[:6]}…{key[-4:]}"
