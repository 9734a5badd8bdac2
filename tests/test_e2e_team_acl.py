"""Real mitmdump proxies on a real redis-server whose ACL user lacks a right the README's
line gives it (the notices channel, PUBLISH, the scripting commands), or loses one while
they run: the proxy keeps serving and saving what it can, says what is missing once,
names a failed write as a write, and says what it could not save when it stops."""

from __future__ import annotations

import re

import pytest

from rotator.admin import ops
from rotator.store.redis_store import RedisStore
from tests.support.e2e import FLUSH_DEADLINE_S, client, counts_in_redis, send
from tests.support.harness import counts_seen, poll
from tests.support.redis_acl import PASSWORD, acl_user


@pytest.fixture
def pool(redis_server, keys):
    """Two keys in the pool, added as the server's admin."""
    store = RedisStore(redis_server.url)
    for i, key in enumerate(keys[:2]):
        ops.run(store, ops.add_key(key, f"K{i}", i + 1))
    store.close()
    return keys[:2]


# Redis 7 gives a new user no channel: the README's line without `&kimi-rotator:*`; or
# the channel, but not the command.
@pytest.mark.parametrize("without", [("&kimi-rotator:*",), ("+publish",)], ids=["no-channel", "no-publish"])
def test_a_user_that_may_not_publish_still_saves_every_count_and_says_so_once(
    redis_server, fake_kimi, start_proxy, pool, without
):
    url = acl_user(redis_server, without)
    proxy = start_proxy(fake_kimi, options={"kimi_store": url})
    fake_kimi.set_kimi_error(pool[0], "too_many_requests", times=1)  # a cooldown: told to the team
    with client() as c:
        answers = [send(c, proxy).status_code for _ in range(6)]
        assert answers == [200] * 6
        seen = counts_seen(fake_kimi, pool)
        assert seen[pool[0]][1] < seen[pool[0]][0]  # the 429 was answered: the key cooled
        assert poll(lambda: counts_in_redis(redis_server.url, pool) == seen, FLUSH_DEADLINE_S), (
            counts_in_redis(redis_server.url, pool), seen, proxy.output())
        # The cooldown itself reached the store.
        cooled = RedisStore(redis_server.url).read().accounts[0]
        assert cooled.rate_limit_reset_time > 0 and cooled.cooldown_reason
        assert [send(c, proxy).status_code for _ in range(4)] == [200] * 4
        seen = counts_seen(fake_kimi, pool)
        assert poll(lambda: counts_in_redis(redis_server.url, pool) == seen, FLUSH_DEADLINE_S)
    proxy.stop()
    log = proxy.output()
    untold = [line for line in log.splitlines() if "cannot tell the team" in line]
    assert len(untold) == 1, log
    assert "kimi-rotator:notices" in untold[0] and "127.0.0.1" in untold[0] and PASSWORD not in untold[0]
    assert "cannot write" not in log and "cannot read" not in log and "not saved" not in log, log


def test_a_user_that_loses_set_has_its_failures_named_as_writes_and_its_unsaved_counts_said_at_exit(
    redis_server, fake_kimi, start_proxy, pool
):
    url = acl_user(redis_server)
    proxy = start_proxy(fake_kimi, options={"kimi_store": url})
    with client() as c:
        assert [send(c, proxy).status_code for _ in range(2)] == [200] * 2
        assert poll(lambda: counts_in_redis(redis_server.url, pool) == counts_seen(fake_kimi, pool), FLUSH_DEADLINE_S)
        redis_server.command("ACL", "SETUSER", "kimi", "-set")
        mark = len(proxy.output())
        assert [send(c, proxy).status_code for _ in range(3)] == [200] * 3
        assert proxy.wait_for_output("cannot (read|write) the team store", FLUSH_DEADLINE_S, start=mark), proxy.output()
    proxy.stop()
    log = proxy.output()[mark:]
    assert "cannot write the team store" in log and "cannot read" not in log, log
    assert len(re.findall("cannot write the team store", log)) == 1, log
    lost = [line for line in log.splitlines() if "not saved" in line]
    assert len(lost) == 1 and "3 request(s)" in lost[0] and "127.0.0.1" in lost[0], log


def test_a_user_without_the_scripting_commands_says_so_once_and_serves_without_team_caps(
    redis_server, fake_kimi, start_proxy, pool
):
    url = acl_user(redis_server, ("+evalsha",))
    proxy = start_proxy(fake_kimi, options={"kimi_store": url})
    with client() as c:
        answers = [send(c, proxy).status_code for _ in range(3)]
        assert proxy.wait_for_output("team-wide in-flight caps paused", 5), proxy.output()
        # The reconnect loop's tries for two seconds: the caps stay paused, and quiet.
        end = len(proxy.output())
        assert not proxy.wait_for_output("team-wide in-flight caps hold again", 2, start=end), proxy.output()
        answers += [send(c, proxy).status_code for _ in range(3)]
        assert answers == [200] * 6
        paused = [line for line in proxy.output().splitlines() if "in-flight caps" in line]
        assert len(paused) == 1 and "EVALSHA" in paused[0], proxy.output()
        # The user gets EVALSHA: the caps hold again, and say so once.
        redis_server.command("ACL", "SETUSER", "kimi", "+evalsha")
        assert proxy.wait_for_output("team-wide in-flight caps hold again", 10), proxy.output()
        assert send(c, proxy).status_code == 200
    proxy.stop()
    again = [line for line in proxy.output().splitlines() if "in-flight caps" in line]
    assert len(again) == 2, proxy.output()
