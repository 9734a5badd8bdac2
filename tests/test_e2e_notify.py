"""End to end, notifications (issue 28): a real mitmdump with the addon in front of the
fake Kimi, telling a local receiver through apprise's json:// what a person should hear,
once per change, and nothing per request."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from rotator.core.keys import mask_key
from testbed.fake_kimi import MESSAGES_PATH, FakeKimi
from testbed.processes import Proxy
from testbed.receiver import Receiver
from tests.support.accounts import fake_key
from tests.support.harness import run_cli

MSG = {"model": "kimi-for-coding", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"x-api-key": "sk-kimi-placeholder", "anthropic-version": "2023-06-01"}


def send(c: httpx.Client, proxy: Proxy) -> httpx.Response:
    return c.post(proxy.url + MESSAGES_PATH, json=MSG, headers=HEADERS)


def used(fake: FakeKimi, key: str) -> int:
    return sum(1 for r in fake.message_requests() if r.key == key)


@pytest.mark.slow
def test_a_revoked_key_and_a_pool_that_cannot_serve_are_each_said_once_and_traffic_never(
    fake_kimi: FakeKimi, write_accounts, start_proxy, receiver: Receiver
) -> None:
    keys = [fake_key(f"notify{i}") for i in range(2)]
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "invalid_auth")  # 401, forever
    proxy = start_proxy(fake_kimi, options={
        "kimi_notify": f"json://127.0.0.1:{receiver.port}/", "kimi_max_wait": "0",
    })
    with httpx.Client(trust_env=False, timeout=30) as c:
        for _ in range(6):  # key 0 answers 401 once and is disabled; key 1 serves them all
            assert send(c, proxy).status_code == 200
        assert used(fake_kimi, keys[0]) == 1
        (disabled,) = receiver.wait(1)
        # Every key cooling: key 1 rate limited for a minute, key 0 disabled.
        fake_kimi.set_kimi_error(keys[1], "overloaded", headers={"retry-after": "60"})
        for _ in range(4):
            r = send(c, proxy)
            assert r.status_code == 429, r.text
            assert "every key is cooling down" in r.text
        assert used(fake_kimi, keys[1]) == 7  # the 429, then answered by the proxy itself
        bodies = receiver.wait(2)
    assert proxy.stop() == 0  # what was queued is sent at exit
    bodies = receiver.bodies
    assert [b["title"] for b in bodies] == ["Kimi key disabled: [0] Account 0", "Kimi pool cannot serve"], bodies
    assert disabled == bodies[0]
    message = str(bodies[0]["message"])
    assert mask_key(keys[0]) in message and "kimi-rotator enable-key 0" in message
    assert "every key is cooling down or disabled (1 cooling down, 1 disabled)" in str(bodies[1]["message"])
    sent = json.dumps(bodies)
    assert all(key not in sent for key in keys)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_notify_test_verb_says_which_url_failed_and_exits_1(receiver: Receiver, tmp_path) -> None:
    live = f"json://127.0.0.1:{receiver.port}/"
    done = run_cli(tmp_path / "accounts.json", "notify-test", live)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, f"sent to json://127.0.0.1:{receiver.port}", "")
    assert receiver.wait(1)[0]["title"] == "kimi-rotator: test notification"
    port = closed_port()
    done = run_cli(tmp_path / "accounts.json", "notify-test", env={"KIMI_ROTATOR_NOTIFY": f"{live},json://127.0.0.1:{port}/"})
    assert done.returncode == 1, done
    (failed,) = done.stderr.strip().splitlines()
    assert failed.startswith(f"failed: json://127.0.0.1:{port}: ") and "Connection refused" in failed
    assert len(receiver.wait(2)) == 2  # the live one took it all the same


class Silent:
    """A receiver that accepts each connection and never answers (held until closed)."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        self.accepted = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._held.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.server.close()
        for conn in self._held:
            conn.close()


@pytest.mark.slow
def test_a_receiver_that_never_answers_does_not_slow_requests(
    fake_kimi: FakeKimi, write_accounts, start_proxy
) -> None:
    silent = Silent()
    keys = [fake_key(f"silent{i}") for i in range(2)]
    write_accounts(keys, "round-robin")
    fake_kimi.set_kimi_error(keys[0], "invalid_auth")
    proxy = start_proxy(fake_kimi, options={"kimi_notify": f"json://127.0.0.1:{silent.port}/"})
    try:
        with httpx.Client(trust_env=False, timeout=30) as c:
            assert send(c, proxy).status_code == 200  # key 0 disabled: a message goes out ...
            assert silent.accepted.wait(15)  # ... and hangs at the receiver
            took = []
            for _ in range(20):
                start = time.monotonic()
                assert send(c, proxy).status_code == 200
                took.append(time.monotonic() - start)
        # Delivery is off the proxy's path: no request waits for the send (its deadline is 10 s).
        assert max(took) < 2.0, took
        assert proxy.stop() == 0  # and at exit the send is given up within 5 s
    finally:
        silent.close()
