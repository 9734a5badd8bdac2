"""Team-wide in-flight slots on a Redis store: a key's cap holds for every proxy.

Each key has a sorted set of slots (`urls.slots_key`): a member per request in flight,
named for the proxy holding it, scored with when it expires by the server's clock (so
machines whose clocks differ agree). Taking a slot (drop the expired, count, add if
under the cap) is one script run on the server: one round trip, no read-modify-write
from here. Slots given back (remove, and tell the team if the key was at its cap) ride
along with this proxy's next take, or go in one script of their own when the caller
flushes them: so a busy proxy makes one round trip per request, not two. A proxy
refreshes its own slots every third of their lifetime, so a proxy that dies (SIGKILL, a
lost machine) stops refreshing and its slots expire. A "freed" notice the server refuses
(a user without the channel) is dropped, never the slot given back with it; and whether
the store can run the scripts at all (an ACL without EVALSHA) is what `ping` asks.

Runs on the proxy's event loop, every script on one pipelined connection
(`RedisLine`): the slot scripts are on the request path, and there redis-py's client
costs more than Redis does.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import redis

from rotator.store import StoreError
from rotator.store.redis_line import RedisLine, Script
from rotator.store.urls import NOTICE_FREED, key_id, notices_channel, slots_key

if TYPE_CHECKING:
    from rotator.store.redis_store import RedisStore

# Giving back: per slot, KEYS[i] its set and ARGV member, cap, notice (from `first`). A
# proxy may be waiting for a slot only if the key was at its cap: only then is the team
# told (pcall: a notice refused is dropped; others retry the key after team_caps.HOLD_MS).
# Shared by both scripts below.
GIVE_BACK = """
local function give_back(first_key, first_arg, channel)
  local given = 0
  local at = first_arg
  for i = first_key, #KEYS do
    if redis.call('ZREM', KEYS[i], ARGV[at]) == 1 then
      given = given + 1
      if redis.call('ZCARD', KEYS[i]) + 1 >= tonumber(ARGV[at + 1]) then
        redis.pcall('PUBLISH', channel, ARGV[at + 2])
      end
    end
    at = at + 3
  end
  return given
end
"""

# A set of slots lives as long as its longest-lived slot: proxies may run with different
# lifetimes (kimi_slot_ttl), and a short one must not cut the others' slots off.
KEEP_FOR = """
local function keep_for(slots, ttl)
  if redis.call('PTTL', slots) < ttl then redis.call('PEXPIRE', slots, ttl) end
end
"""

# KEYS[1] the slots to take one of, then the sets of slots given back with it; ARGV cap,
# lifetime ms, member, channel, then the slots given back. Returns the slots held after,
# negative if refused. The set expires with its longest-lived slot, so a key nobody uses
# leaves nothing.
TAKE = Script(GIVE_BACK + KEEP_FOR + """
give_back(2, 5, ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then return -held end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
keep_for(KEYS[1], tonumber(ARGV[2]))
return held + 1
""")

# KEYS the sets of the slots given back; ARGV channel, then the slots. Returns how many
# were still held.
GIVE = Script(GIVE_BACK + """
return give_back(1, 2, ARGV[1])
""")

# KEYS the slot sets; ARGV lifetime ms, then per key: how many members, the members.
# XX: only slots still held move on; a slot given back on another connection after this
# refresh was planned, but run before it, must not come back.
REFRESH = Script(KEEP_FOR + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local at = 2
for i, slots in ipairs(KEYS) do
  local n = tonumber(ARGV[at])
  for j = 1, n do
    redis.call('ZADD', slots, 'XX', now + ttl, ARGV[at + j])
  end
  keep_for(slots, ttl)
  at = at + n + 1
end
return #KEYS
""")


# KEYS[1] a set that holds nothing. Calls every command the scripts above call, changing
# nothing; returns the first one the user may not run, or "" (Redis's own error in a
# script names only the line). Run as they are, so a user without EVALSHA fails here too.
PROBE = Script("""
local calls = {
  {'TIME'}, {'ZREMRANGEBYSCORE', KEYS[1], '-inf', '-inf'}, {'ZADD', KEYS[1], 'XX', 0, 'probe'},
  {'ZREM', KEYS[1], 'probe'}, {'ZCARD', KEYS[1]}, {'PEXPIRE', KEYS[1], 1}, {'PTTL', KEYS[1]},
}
for _, call in ipairs(calls) do
  local answer = redis.pcall(unpack(call))
  if type(answer) == 'table' and answer.err and string.find(answer.err, "can't run this command", 1, true) then
    return call[1]
  end
end
return ''
""")
REFUSED_IN_SCRIPT = "can't run this command"


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
        # key -> our members, each with the slots held just after it was taken and the cap
        self._held: defaultdict[str, list[tuple[str, int, int]]] = defaultdict(list)
        self._giving: list[tuple[str, str, int]] = []  # (key, member, cap): given, not yet sent
        self._line = RedisLine(store.new_async_connections())
        self._channel = notices_channel(store.prefix)

    @property
    def held(self) -> int:
        """Slots this proxy holds now, over all keys (those given back but not yet sent
        included: the team still counts them)."""
        return sum(len(members) for members in self._held.values()) + len(self._giving)

    @property
    def unsent(self) -> int:
        return len(self._giving)

    async def take(self, key: str, cap: int) -> bool:
        member = f"{self.holder}:{next(self._numbers)}"
        held = int(await self._with_given_back(
            TAKE, [slots_key(self.store.prefix, key)], [cap, self.ttl_ms, member, self._channel],
            unanswered=[(key, member, cap)],  # else, if taken, it would stay held until it expires
        ))
        if held < 0:
            return False
        self._held[key].append((member, held, cap))
        return True

    def give(self, key: str, cap: int) -> bool:
        members = self._held.get(key)
        if not members:
            return False
        # Forgotten at once: if the server never hears of it, the slot is no longer
        # refreshed and expires.
        member, held_then, _ = members.pop()
        if not members:
            del self._held[key]
        self._giving.append((key, member, cap))
        return held_then >= cap

    async def flush(self) -> None:
        if self._giving:
            await self._with_given_back(GIVE, [], [self._channel])

    async def _with_given_back(
        self, script: Script, keys: list[str], args: list[str | int],
        unanswered: list[tuple[str, str, int]] | None = None,
    ) -> Any:
        """Run `script` with the slots given back since the last call added to its KEYS
        and ARGV. No answer: the server may have run it all the same, so those slots, and
        `unanswered`, go again with the next call (removing a slot twice, or one never
        taken, changes nothing)."""
        giving, self._giving = self._giving, []
        for key, member, cap in giving:
            keys.append(slots_key(self.store.prefix, key))
            args += [member, cap, f"{NOTICE_FREED} {key_id(key)}"]
        try:
            return await self._run(script, keys, args)
        except (StoreError, asyncio.CancelledError):
            self._giving = giving + (unanswered or []) + self._giving
            raise

    async def refresh(self) -> None:
        held = {key: [member for member, _, _ in members] for key, members in self._held.items() if members}
        if not held:
            return
        keys = [slots_key(self.store.prefix, key) for key in held]
        args: list[str | int] = [self.ttl_ms]
        for members in held.values():
            args += [len(members), *members]
        await self._run(REFRESH, keys, args)

    async def ping(self) -> None:
        with self.store.errors("read"):
            await self._probe()

    async def _run(self, script: Script, keys: list[str], args: list[str | int]) -> Any:
        with self.store.errors("write"):
            try:
                return await self._line.run(script, keys, args)
            except redis.ResponseError as e:
                if REFUSED_IN_SCRIPT in str(e):
                    await self._probe()  # names the command
                raise

    async def _probe(self) -> None:
        """Raises NoPermissionError naming the first command of the scripts (EVALSHA and
        SCRIPT LOAD included) that the user may not run."""
        refused = await self._line.run(PROBE, [f"{self.store.prefix}slots:probe"], [])
        if refused:
            name = refused.decode() if isinstance(refused, bytes) else str(refused)
            raise redis.exceptions.NoPermissionError(f"this user has no permissions to run the '{name.lower()}' command")

    async def close(self) -> None:
        # Slots still held go back now rather than at their expiry (a proxy stopping
        # with requests in flight: they have been answered or cut by now).
        for key in list(self._held):
            while key in self._held:
                self.give(key, self._held[key][-1][2])  # as taken: "freed" only if at the cap
        try:
            await asyncio.wait_for(self.flush(), 1.0)
        except Exception:
            pass  # away: they expire
        await self._line.close()
