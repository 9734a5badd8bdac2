"""A Redis (or Valkey) server as a state store: one pool shared by a team's proxies and CLIs.

It owns the pool's layout in Redis and every change to it. The whole accounts file lives
as its JSON under `<prefix>accounts`, with a counter `<prefix>version` that every write
increments. Each write (a proxy's `sync`, a person's `edit`) is one optimistic
transaction: WATCH both keys, read, change in Python (`merge.syncing`, the one merge rule,
or the person's change), then MULTI/EXEC SET + INCR; a conflicting writer makes EXEC fail
and the whole step is tried again on what is stored now. So no update is lost and counts
add exactly across proxies, as on the file store. A write the team must see at once is
then announced on the notices channel, apart from it: a refused notice costs the notice
(`untold` says why), never the write.

The version only goes up, so a store that finds no pool, or an older version, than it
last saw has lost the pool (a server restarted without its data, a flush, an older
snapshot): it writes nothing and raises `PoolLost`, and the proxy puts its pool back
from memory (`restore`) at a version far ahead of any other proxy's view of the lost
one, so they merge into it rather than take it for lost too.

Every call is bounded by short timeouts and redis-py's own retries are off: the save loop
(`rotator.sync.save_loop`) already keeps changes and retries. Errors become `StoreError` naming the
server with the password masked; a stored value that can't be read is never overwritten.
Blocking (the sync client): call from a worker thread, as `PoolSync` does. The live state a
team shares (`team_slots`, `team_events`) runs on redis-py's asyncio client instead, on
the proxy's event loop.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from rotator.core import edit_stamps, merge
from rotator.core.clock import SYSTEM_CLOCK, Clock
from rotator.core.keys import scrub
from rotator.core.models import AccountsFile
from rotator.store import PoolLost, StoreError
from rotator.store.urls import DEFAULT_PREFIX, NOTICE_STATE, SCHEMES, masked_url, notices_channel

if TYPE_CHECKING:
    from rotator.store.redis_events import RedisEvents
    from rotator.store.redis_pins import RedisPins
    from rotator.store.redis_slots import RedisSlots

SOCKET_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 0.75
MAX_CONFLICT_RETRIES = 50
# A restored pool's version is this far ahead of the lost one's (as its restorer saw
# it): ahead of what any other proxy saw of it, so none takes the restored pool for lost.
RESTORED_VERSION_STEP = 1 << 32


class RedisStoreError(StoreError):
    """The Redis server can't be read or written; the message names it (password masked)."""

    def __init__(self, location: str, problem: str, action: str = "read") -> None:
        super().__init__(f"{location}: {problem}")
        self.location = location
        self.problem = problem
        self.action = action


class RedisStore:
    """The `StateStore` on one Redis server and key prefix."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, clock: Clock = SYSTEM_CLOCK) -> None:
        try:
            scheme = urlsplit(url).scheme
        except ValueError as e:  # "[" without "]": not even a URL
            raise StoreError(f"{masked_url(url)}: not a usable Redis URL ({e})") from e
        if scheme not in SCHEMES:
            raise StoreError(f"{masked_url(url)}: not a redis:// or rediss:// URL")
        self.url = url
        self.prefix = prefix
        self._clock = clock  # this process's: the one a proxy's changes are timed by
        self.location = masked_url(url)
        self.what = "the team store"
        prefix_option = "" if prefix == DEFAULT_PREFIX else f" --store-prefix {shlex.quote(prefix)}"
        self.cli_options = f"--store {shlex.quote(self.location)}{prefix_option}"
        self._accounts_key = f"{prefix}accounts"
        self._version_key = f"{prefix}version"
        self._channel = notices_channel(prefix)
        self._version: int | None = None  # the version this store last read or wrote
        self.untold: str | None = None
        self._last_read_failed = False
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
                health_check_interval=0,
            )
        except ValueError as e:
            raise StoreError(f"{self.location}: not a usable Redis URL ({self._scrub(e)})") from e

    # -- the interface -------------------------------------------------------------
    def read(self) -> AccountsFile:
        with self.errors("read"):
            raw, version = self._client.mget(self._accounts_key, self._version_key)
            version = int(version or 0)
        state = self._parse(raw)
        self._check_kept(raw, version)
        return state

    def edit(self, change: Callable[[AccountsFile], AccountsFile | None]) -> AccountsFile:
        return self._transact(merge.editing(change, self.server_time_ms()), tell_team=True)[0]

    def server_time_ms(self) -> int:
        """The server's clock (`TIME`): what every stamp in this store is taken by, so the
        team's machines agree on it whatever their own clocks say."""
        with self.errors("read"):
            seconds, micros = self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def load(self) -> AccountsFile:
        try:
            with self.errors("read"):
                raw, version = self._client.mget(self._accounts_key, self._version_key)
            state = self._parse(raw)
        except StoreError:
            self._last_read_failed = True
            raise
        self._version = int(version or 0)
        self._last_read_failed = False
        return self._settled(state)

    def _settled(self, state: AccountsFile) -> AccountsFile:
        # Stamps from the future read as now, and written so at once (`merge.syncing`):
        # a proxy change made from now on is newer than the person's.
        try:
            now = self.server_time_ms()
            if edit_stamps.stamps_ahead(state, now):
                state, _ = self._transact(merge.syncing(merge.PoolChange(), now))
        except StoreError:
            self._last_read_failed = True  # the next save settles them
        return state

    def sync(self, changes: merge.PoolChange) -> AccountsFile | None:
        """Merge `changes` into the stored pool; the state stored now, or None if neither
        we nor anyone else changed it since this store last saw it."""
        try:
            if not changes and not self._last_read_failed:
                with self.errors("read"):
                    version = int(self._client.get(self._version_key) or 0)
                if version == self._version:
                    return None
            now = self.server_time_ms()  # the proxy's changes compared on the server's clock
            state, _ = self._transact(
                merge.syncing(changes, now, now - self._clock.now_ms()),
                tell_team=merge.is_decisive(changes),
            )
        except StoreError:
            self._last_read_failed = True
            raise
        self._last_read_failed = False
        return state

    def restore(self, pool: Callable[[AccountsFile], AccountsFile]) -> AccountsFile | None:
        """Put a pool back into a store that lost it: `pool(what is stored now)` (nothing,
        or what someone stored since), at `RESTORED_VERSION_STEP` past the lost version,
        and tell the team. None if the pool is no longer lost: nothing written."""
        for _ in range(MAX_CONFLICT_RETRIES):
            errors = self.errors("read")
            with errors, self._client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self._accounts_key, self._version_key)
                    raw = pipe.get(self._accounts_key)
                    version = int(pipe.get(self._version_key) or 0)
                    stored = self._parse(raw)  # unreadable: raises, nothing written
                    if self._lost(raw, version) is None:
                        return None
                    restored = pool(stored)
                    after = self._serialise(restored)
                    new_version = max(version, self._version or 0) + RESTORED_VERSION_STEP
                    errors.action = "write"
                    pipe.multi()
                    pipe.set(self._accounts_key, after)
                    pipe.set(self._version_key, new_version)
                    pipe.execute()
                except redis.WatchError:
                    continue  # someone wrote meanwhile: lost still?
            self._version = new_version
            self._last_read_failed = False
            self._tell_team()
            return restored
        raise RedisStoreError(
            self.location, f"too many conflicting writers ({MAX_CONFLICT_RETRIES} tries)", "write"
        )

    def team_slots(self, ttl_ms: int) -> "RedisSlots":
        from rotator.store.redis_slots import RedisSlots

        return RedisSlots(self, ttl_ms)

    def team_events(self) -> "RedisEvents":
        from rotator.store.redis_events import RedisEvents

        return RedisEvents(self)

    def team_pins(self) -> "RedisPins":
        from rotator.store.redis_pins import RedisPins

        return RedisPins(self)

    def close(self) -> None:
        self._client.close()

    def new_async_client(self) -> redis.asyncio.Redis:
        """An asyncio client of this server, with the same timeouts, for the proxy's event
        loop; its user closes it (`aclose`, which closes its connections too)."""
        return redis.asyncio.Redis.from_pool(self._async_pool(SOCKET_TIMEOUT_S))

    def new_async_connections(self) -> Callable[[], redis.asyncio.connection.AbstractConnection]:
        """A maker of unconnected asyncio connections to this server (the URL's user,
        password, database and TLS), with the connect timeout but no socket timeout: for
        a caller that times each call itself (`RedisLine`)."""
        return self._async_pool(None).make_connection

    def _async_pool(self, socket_timeout_s: float | None) -> redis.asyncio.ConnectionPool:
        # No retries of redis-py's own: the callers retry, with their own pauses.
        return redis.asyncio.ConnectionPool.from_url(
            self.url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    def errors(self, action: str) -> _RedisErrors:
        """A context in which redis-py's errors become one-line `RedisStoreError`s."""
        return _RedisErrors(self, action)

    # -- one optimistic transaction ------------------------------------------------------
    def _transact(
        self, change: Callable[[AccountsFile], AccountsFile | None], tell_team: bool = False
    ) -> tuple[AccountsFile, bool]:
        """`tell_team`: the write is one other proxies must see at once (a person's
        change, a cooldown): a state notice follows it (`_tell_team`)."""
        for _ in range(MAX_CONFLICT_RETRIES):
            errors = self.errors("read")
            with errors:
                with self._client.pipeline(transaction=True) as pipe:
                    try:
                        pipe.watch(self._accounts_key, self._version_key)
                        raw = pipe.get(self._accounts_key)
                        version = int(pipe.get(self._version_key) or 0)
                        current = self._parse(raw)  # unreadable: raises, nothing written
                        self._check_kept(raw, version)  # lost: raises, nothing written
                        before = raw.decode() if raw is not None else None
                        changed = change(current)
                        after = self._serialise(changed) if changed is not None else None
                        if after is None or after == before:
                            pipe.unwatch()
                            self._version = version
                            return current if changed is None else changed, False
                        errors.action = "write"
                        pipe.multi()
                        pipe.set(self._accounts_key, after)
                        pipe.incr(self._version_key)
                        new_version = pipe.execute()[1]
                    except redis.WatchError:
                        continue  # someone wrote between our read and our write: again
            self._version = int(new_version)
            if tell_team:
                self._tell_team()
            return changed, True
        raise RedisStoreError(
            self.location, f"too many conflicting writers ({MAX_CONFLICT_RETRIES} tries)", "write"
        )

    def _tell_team(self) -> None:
        """A state notice, after the write it announces: one the server refuses (a user
        without the channel or PUBLISH) is dropped, and `untold` says why until one goes."""
        try:
            self._client.publish(self._channel, NOTICE_STATE)
        except (redis.RedisError, OSError) as e:
            self.untold = f"cannot publish on {self._channel} ({self._scrub(e)})"
        else:
            self.untold = None

    # -- helpers -------------------------------------------------------------------
    def _lost(self, raw: bytes | None, version: int) -> str | None:
        """What shows the pool this store last saw is gone, or None: no value, or an
        older version (a person's change, emptying the pool included, is a newer one)."""
        seen = self._version
        if not seen or (raw is not None and version >= seen):
            return None
        found = f"no {self._accounts_key}" if raw is None else f"an older {self._accounts_key}"
        return f"{self.location} lost the pool ({found}, {self._version_key} {version} where it was {seen})"

    def _check_kept(self, raw: bytes | None, version: int) -> None:
        why = self._lost(raw, version)
        if why is not None:
            raise PoolLost(why)

    def _parse(self, raw: bytes | None) -> AccountsFile:
        if raw is None:
            return AccountsFile()  # an empty pool, like a missing file
        try:
            return AccountsFile.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "top level"
            raise RedisStoreError(
                self.location,
                f"{self._accounts_key} holds no readable pool (at {where}: {first['msg']}); "
                "not writing until it is fixed",
            ) from None

    def _serialise(self, state: AccountsFile) -> str:
        try:
            return state.to_json()
        except (PydanticSerializationError, ValueError, RecursionError) as e:
            raise RedisStoreError(
                self.location, f"cannot be saved as JSON ({str(e).splitlines()[0]})", "write"
            ) from e

    def _refused(self, error: BaseException) -> str:
        """A permission the ACL user lacks, by name: the command, or else its keys."""
        text = self._scrub(error)
        command = re.search(r"permissions to run the '([^']+)' command", text)
        if command:
            return f"permission denied: this user may not run {command.group(1).replace('|', ' ').upper()}"
        if "channel" in text:
            return f"permission denied for the channel {self._channel} ({text})"
        return f"permission denied for keys {self.prefix}* ({text})"

    def _scrub(self, error: BaseException) -> str:
        text = str(error) or type(error).__name__
        password = urlsplit(self.url).password
        if password:
            text = text.replace(password, "***")
        return scrub(text.splitlines()[0] if text else text)



class _RedisErrors:
    """Turns redis-py's errors into one-line `RedisStoreError`s."""

    def __init__(self, store: RedisStore, action: str) -> None:
        self.store = store
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> bool:
        if error is None or isinstance(error, (StoreError, redis.WatchError)):
            return False
        store = self.store
        if isinstance(error, (redis.TimeoutError, TimeoutError)):
            problem = f"no answer within {SOCKET_TIMEOUT_S:g} s ({store._scrub(error)})"
        elif isinstance(error, redis.AuthenticationError):
            problem = f"authentication failed ({store._scrub(error)})"
        elif isinstance(error, redis.exceptions.NoPermissionError):
            problem = store._refused(error)
        elif isinstance(error, (redis.ConnectionError, ConnectionError)):
            problem = f"unreachable ({store._scrub(error)})"
        elif isinstance(error, redis.RedisError):
            problem = f"Redis error ({store._scrub(error)})"
        elif isinstance(error, (UnicodeDecodeError, ValueError)):
            problem = f"{store._version_key} or {store._accounts_key} holds an unreadable value"
        else:
            return False
        raise RedisStoreError(store.location, problem, self.action) from None
