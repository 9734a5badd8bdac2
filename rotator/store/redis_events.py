"""Notices between the processes on a Redis store: one pub/sub channel per pool.

Writes other proxies must see at once publish "state" in their own transaction
(`RedisStore`), a slot given back on a key at its cap publishes "freed <key id>"
(`RedisSlots`), and a proxy that saw Kimi throttle the team publishes "pause <ms>"
(here). A listener reads them on one subscribed connection of the asyncio client.

Pub/sub keeps nothing for a listener that was away: each time it (re)subscribes, it
says so (`on_connected`), and the proxy then reads the stored pool, so nothing missed
stays missed. Anyone who can publish on the channel can send anything: a message that
is not a notice is ignored, and a pause is bounded by the pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from rotator.core.log import ALERT
from rotator.store import Notice, NoticeKind, StoreError
from rotator.store.urls import NOTICE_FREED, NOTICE_LIMITED, NOTICE_PAUSE, NOTICE_STATE, notices_channel

if TYPE_CHECKING:
    from rotator.store.redis_store import RedisStore

logger = logging.getLogger(__name__)

RETRY_FIRST_S = 0.25
RETRY_MOST_S = 5.0
# A quiet channel is checked with a PING this often; no answer by the next check: gone.
CHECK_EVERY_S = 2.0
_KEY_ID_CHARS = frozenset("0123456789abcdef")


def parse_notice(data: bytes | str) -> Notice | None:
    """The notice a channel message carries, or None if it is none."""
    if isinstance(data, bytes):
        try:
            data = data.decode("ascii")
        except UnicodeDecodeError:
            return None
    kind, _, argument = data.partition(" ")
    if kind == NOTICE_STATE and not argument:
        return Notice(NoticeKind.STATE)
    if kind in (NOTICE_FREED, NOTICE_LIMITED) and len(argument) == 16 and _KEY_ID_CHARS.issuperset(argument):
        return Notice(NoticeKind.FREED if kind == NOTICE_FREED else NoticeKind.LIMITED, key_id=argument)
    if kind == NOTICE_PAUSE and argument.isdigit() and len(argument) <= 9:
        return Notice(NoticeKind.PAUSE, pause_ms=int(argument))
    return None


class RedisEvents:
    """The `TeamEvents` of one `RedisStore`."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.channel = notices_channel(store.prefix)
        self.away: str | None = None  # why the channel can't be heard, while it can't
        self._client = store.new_async_client()

    async def listen(self, on_notice: Callable[[Notice], None], on_connected: Callable[[], None]) -> None:
        pause_s = RETRY_FIRST_S
        while True:
            try:
                await self._listen_once(on_notice, on_connected)
            except StoreError as e:
                if self.away is None:
                    self.away = str(e)
                    logger.warning(
                        "kimi-rotator: notices from %s lost (%s); changes made elsewhere reach this proxy at its saves until it answers",
                        self.store.location, e.args[0] if e.args else e,
                    )
            else:
                pause_s = RETRY_FIRST_S
            await asyncio.sleep(pause_s)
            pause_s = min(RETRY_MOST_S, pause_s * 2)

    async def _listen_once(self, on_notice: Callable[[Notice], None], on_connected: Callable[[], None]) -> None:
        pubsub = self._client.pubsub()
        try:
            with self.store.errors("read"):
                await pubsub.subscribe(self.channel)
                # The subscription is confirmed before anything counts as heard.
                if await pubsub.get_message(timeout=CHECK_EVERY_S) is None:
                    raise ConnectionError("no answer to SUBSCRIBE")
                if self.away is not None:
                    logger.log(ALERT, "kimi-rotator: notices from %s are heard again", self.store.location)
                    self.away = None
                on_connected()
                unanswered = False
                while True:
                    message = await pubsub.get_message(timeout=CHECK_EVERY_S)
                    if message is None:
                        if unanswered:
                            raise ConnectionError(f"no answer to PING within {CHECK_EVERY_S:g} s")
                        await pubsub.ping()
                        unanswered = True
                        continue
                    unanswered = False
                    if message.get("type") == "message":
                        notice = parse_notice(message["data"])
                        if notice is not None:
                            on_notice(notice)
        finally:
            try:
                await asyncio.wait_for(pubsub.aclose(), 1.0)
            except Exception:
                pass  # the connection is gone already

    async def pause(self, pause_ms: int) -> None:
        with self.store.errors("write"):
            await self._client.publish(self.channel, f"{NOTICE_PAUSE} {int(pause_ms)}")

    async def limited(self, key_id: str) -> None:
        with self.store.errors("write"):
            await self._client.publish(self.channel, f"{NOTICE_LIMITED} {key_id}")

    async def close(self) -> None:
        # The listener's own connection closed with its task; this closes the others.
        try:
            await asyncio.wait_for(self._client.aclose(), 1.0)
        except Exception:
            pass  # gone already
