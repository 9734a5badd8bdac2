"""Team-wide in-flight slots on a Redis store: a key's cap holds for every proxy.

Each key has a sorted set of slots (`urls.slots_key`): a member per request in flight,
named for the proxy holding it, scored with when it expires by the server's clock (so
machines whose clocks differ agree). Taking a slot (drop the expired, count, add if
under the cap) and giving one back (remove it, and tell the team if the key was at its
cap) are each one script run on the server: one round trip, no read-modify-write from
here. A proxy refreshes its own slots every third of their lifetime, so a proxy that
dies (SIGKILL, a lost machine) stops refreshing and its slots expire.

Runs on the proxy's event loop with redis-py's asyncio client.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections import defaultdict
from typing import TYPE_CHECKING

from rotator.store.urls import NOTICE_FREED, key_id, notices_channel, slots_key

if TYPE_CHECKING:
    from rotator.store.redis_store import RedisStore

# KEYS[1] the slots; ARGV cap, lifetime ms, member. Returns the slots held after, negative
# if refused. The set expires with its newest slot, so a key nobody uses leaves nothing.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then return -held end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return held + 1
"""

# KEYS[1] the slots; ARGV member, cap, channel, notice. A proxy may be waiting for a slot
# only if the key was at its cap: only then is the team told.
GIVE = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 1 and redis.call('ZCARD', KEYS[1]) + 1 >= tonumber(ARGV[2]) then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return removed
"""

# KEYS the slot sets; ARGV lifetime ms, then per key: how many members, the members.
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local at = 2
for i, slots in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  for j = 1, n do
    redis.call('ZADD', slots, now + ttl, ARGV[at + j])
  end
  redis.call('PEXPIRE', slots, ttl)
  at = at + n + 1
end
return #KEYS
"""


def holder_name() -> str:
    """This proxy, as slot members name it: host and process, unique enough per team."""
    return f"{socket.gethostname()}:{os.getpid()}"


class RedisSlots:
    """The `TeamSlots` of one `RedisStore`."""

    def __init__(self, store: RedisStore, ttl_ms: int, holder: str | None = None) -> None:
        self.store = store
        self.ttl_ms = ttl_ms
        self.holder = holder or holder_name()
        self._numbers = itertools.count(1)
        self._held: defaultdict[str, list[str]] = defaultdict(list)  # key -> our members
        self._client = client = store.new_async_client()
        self._take = client.register_script(TAKE)
        self._give = client.register_script(GIVE)
        self._refresh = client.register_script(REFRESH)
        self._channel = notices_channel(store.prefix)

    @property
    def held(self) -> int:
        """Slots this proxy holds now, over all keys."""
        return sum(len(members) for members in self._held.values())

    async def take(self, key: str, cap: int) -> bool:
        member = f"{self.holder}:{next(self._numbers)}"
        with self.store.errors("write"):
            held = await self._take(keys=[slots_key(self.store.prefix, key)], args=[cap, self.ttl_ms, member])
        if int(held) < 0:
            return False
        self._held[key].append(member)
        return True

    async def give(self, key: str, cap: int) -> None:
        members = self._held.get(key)
        if not members:
            return
        # Forgotten first: if the server does not hear of it, the slot is no longer
        # refreshed and expires.
        member = members.pop()
        if not members:
            del self._held[key]
        with self.store.errors("write"):
            await self._give(
                keys=[slots_key(self.store.prefix, key)], args=[member, cap, self._channel, f"{NOTICE_FREED} {key_id(key)}"]
            )

    async def refresh(self) -> None:
        held = {key: list(members) for key, members in self._held.items() if members}
        if not held:
            return
        keys = [slots_key(self.store.prefix, key) for key in held]
        args: list[str | int] = [self.ttl_ms]
        for members in held.values():
            args += [len(members), *members]
        with self.store.errors("write"):
            await self._refresh(keys=keys, args=args)

    async def ping(self) -> None:
        with self.store.errors("read"):
            await self._client.ping()

    async def close(self) -> None:
        # Slots still held go back now rather than at their expiry (a proxy stopping
        # with requests in flight: they have been answered or cut by now).
        for key in list(self._held):
            while self._held.get(key):
                try:
                    await asyncio.wait_for(self.give(key, 1), 1.0)
                except Exception:
                    break  # away: they expire
        try:
            await asyncio.wait_for(self._client.aclose(), 1.0)
        except Exception:
            pass  # its connections are gone already
