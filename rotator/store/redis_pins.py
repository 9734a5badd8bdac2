"""Conversation pins shared by a team's proxies on a Redis store (conversation affinity,
issue 25): which key each live conversation is on, so a conversation keeps its key
whichever proxy of the team serves its turn.

One string per conversation (`urls.pin_key`) holding its key's id (`urls.key_id`: the
key itself is never a value here), expiring after the affinity's TTL of silence; each
turn reads it and renews its TTL in one command (GETEX, Redis 6.2+). Calls go on one
pipelined connection of their own (`RedisLine`), on the proxy's event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rotator.store.redis_line import RedisLine
from rotator.store.urls import pin_key

if TYPE_CHECKING:
    from rotator.store.redis_store import RedisStore


class RedisPins:
    """The `TeamPins` of one `RedisStore`."""

    def __init__(self, store: RedisStore) -> None:
        self.prefix = store.prefix
        self._line = RedisLine(store.new_async_connections())

    async def recall(self, conversation_id: str, ttl_ms: int) -> str | None:
        """The key id the team pinned `conversation_id` to, its TTL renewed; None if none."""
        answer = await self._line.call("GETEX", pin_key(self.prefix, conversation_id), "PX", ttl_ms)
        if answer is None:
            return None
        return answer.decode("ascii", "replace") if isinstance(answer, bytes) else str(answer)

    async def remember(self, conversation_id: str, key_id: str, ttl_ms: int) -> None:
        """Pin `conversation_id` to the key with `key_id` for the team, for `ttl_ms`."""
        await self._line.call("SET", pin_key(self.prefix, conversation_id), key_id, "PX", ttl_ms)

    async def close(self) -> None:
        await self._line.close()
