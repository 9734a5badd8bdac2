"""The README's Redis ACL user, read from README.md and made on a real redis-server:
the least a team store needs, as a person would set it up."""

from __future__ import annotations

import re

from testbed.processes import REPO_ROOT
from testbed.redis_server import RedisServer

README = REPO_ROOT / "README.md"
PASSWORD = "a-long-password"


def readme_acl_line() -> list[str]:
    found = re.search(r"^ACL SETUSER .*$", README.read_text(encoding="utf-8"), re.MULTILINE)
    assert found, "README.md shows no ACL SETUSER line"
    return found.group(0).split()


def acl_user(server: RedisServer, without: tuple[str, ...] = ()) -> str:
    """The README's ACL user `kimi` on `server`, less the rules in `without`; its URL."""
    line = readme_acl_line()
    for rule in without:
        assert rule in line, rule
    server.command(*[part for part in line if part not in without])
    return f"redis://kimi:{PASSWORD}@127.0.0.1:{server.port}/0"
