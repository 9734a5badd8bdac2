"""Notifications: telling a person, once per change, through apprise URLs (desktop, ntfy,
Slack, Discord, a webhook...), that a key was disabled, a key's quota window is spent,
the pool cannot serve or serves again, the team store is gone or back, and optionally
how each key's day went.

It owns the events (`events`), their words (`render`), which of them are news
(`decide`), the URLs and apprise (`channels`), the delivery that never slows the
proxy (`delivery`), and what the running proxy reports (`pool_listener`, a listener of
the pool's events). Of the rest of rotator it uses the core's cleaning of text and
masking of keys, and the pool's events; its core takes keys already masked, plain
numbers and times in ms since the epoch. apprise is the optional extra `notify` and is
imported only when a message is about to be sent.
"""

from __future__ import annotations

from rotator.notify.channels import NOTIFY_ENV, apprise_missing, mask_url, notify_urls, parse_urls
from rotator.notify.decide import POOL_REPEAT_MS, Said, decide
from rotator.notify.delivery import DEADLINE_S, QUEUE_SIZE, Notifier, Sent, notify_test
from rotator.notify.events import (
    Digest,
    DigestRow,
    Event,
    KeyDisabled,
    KeyEnabled,
    KeyRef,
    Message,
    PoolCannotServe,
    PoolServes,
    StoreBack,
    StoreUnreachable,
    WindowSpent,
)
from rotator.notify.render import render

__all__ = [
    "DEADLINE_S", "NOTIFY_ENV", "POOL_REPEAT_MS", "QUEUE_SIZE",
    "Digest", "DigestRow", "Event", "KeyDisabled", "KeyEnabled", "KeyRef", "Message",
    "Notifier", "PoolCannotServe", "PoolServes", "Said", "Sent", "StoreBack",
    "StoreUnreachable", "WindowSpent",
    "apprise_missing", "decide", "mask_url", "notify_test", "notify_urls", "parse_urls", "render",
]
