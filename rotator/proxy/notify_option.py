"""The proxy's notifications: the `kimi_notify` option, the `Notifier` it makes, and
closing it at exit (the events themselves come from `rotator.notify.pool_listener`)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from rotator.notify.channels import NOTIFY_ENV, notify_urls
from rotator.notify.delivery import Notifier
from rotator.notify.pool_listener import CLOSE_TIMEOUT_S, PoolNotifications


def add_notify_options(loader: Any) -> None:
    loader.add_option(
        "kimi_notify", Sequence[str], [],
        "Apprise URLs told once when a key is disabled, a key's quota window is spent, the pool "
        "cannot serve (and serves again) or the team store is gone (and back): desktop://, "
        "ntfy://TOPIC, slack://..., discord://..., json://HOST/PATH ... Separate several with "
        f"commas or repeat the option. Default: ${NOTIFY_ENV}; none: nothing is sent.",
    )


def configure_notify(notifications: PoolNotifications, options: Any, updated: set[str]) -> None:
    """A new notifier when kimi_notify changed; the old one is closed off the event loop."""
    if "kimi_notify" not in updated:
        return
    old = notifications.use(Notifier(notify_urls(options.kimi_notify, os.environ)))
    if old.active:
        threading.Thread(target=old.close, args=(CLOSE_TIMEOUT_S,), name="kimi-notify-close", daemon=True).start()


def close_notify(notifications: PoolNotifications) -> None:
    """At exit (blocking, up to CLOSE_TIMEOUT_S: run it in a thread): what is queued is sent."""
    notifications.notifier.close(CLOSE_TIMEOUT_S)
