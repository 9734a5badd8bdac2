"""The real Claude Code and OpenCode (the npm packages, pinned) through a real mitmdump
with the addon, in both proxy modes, against the fake Kimi: a refused first key, and the
retry's answer reaching the client, event by event (issue 29).

Each client is installed with npm once per session into a temporary folder; these tests
fail (never skip) without node and npm. They run with a throwaway HOME and config, with
their non-essential traffic (telemetry, updates, model lists) off; their API calls go to
the proxy only (reverse mode: the base URL; regular mode: HTTPS_PROXY, with the loopback
DNS shim sending api.kimi.com to the fake).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from testbed.fake_kimi import MESSAGES_PATH
from tests.support.node import npm_install

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.197"
EVENT_DELAY_S = 0.3  # between the fake's SSE events: a whole answer would come at once
RUN_TIMEOUT_S = 90


@pytest.fixture(scope="session")
def claude_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return npm_install(tmp_path_factory, CLAUDE_CODE) / "node_modules" / ".bin" / "claude"


def run_claude(claude: Path, home: Path, env: dict[str, str]) -> tuple[int, list[tuple[float, dict]], str]:
    """`claude -p` with stream-json output: its exit status, each output line with when it
    arrived (seconds from the start), and its stderr."""
    home.mkdir(parents=True, exist_ok=True)
    full_env = {
        "PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_API_KEY": "sk-kimi-placeholder",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1", **env,
    }
    started = time.monotonic()
    process = subprocess.Popen(
        [str(claude), "-p", "say hi", "--output-format", "stream-json", "--verbose", "--include-partial-messages"],
        env=full_env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[tuple[float, dict]] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip():
                lines.append((time.monotonic() - started, json.loads(line)))
        process.wait(RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr is not None
    return process.returncode, lines, process.stderr.read()


@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_claude_code_gets_a_retried_answer_event_by_event(
    mode, claude_code, fake_kimi, keys, write_accounts, start_proxy, tmp_path
):
    limited, serving = keys[:2]
    write_accounts([limited, serving], "sticky")  # every request tries the refused key first
    fake_kimi.set_kimi_error(limited, "too_many_requests")
    fake_kimi.event_delay = EVENT_DELAY_S
    proxy = start_proxy(fake_kimi, mode)
    if mode == "reverse":
        env = {"ANTHROPIC_BASE_URL": proxy.url + "/coding"}
    else:
        env = {"ANTHROPIC_BASE_URL": "https://api.kimi.com/coding", "HTTPS_PROXY": proxy.url,
               "NODE_EXTRA_CA_CERTS": str(proxy.ca_cert)}
    status, lines, stderr = run_claude(claude_code, tmp_path / "home", env)
    assert status == 0, (stderr[-2000:], proxy.output())
    result = [line for _, line in lines if line.get("type") == "result"]
    assert result and result[0]["subtype"] == "success" and not result[0]["is_error"], (lines, proxy.output())
    assert result[0]["result"].startswith("hello from fake kimi #"), result
    # Kimi refused the first key and streamed the second's answer...
    messages = [(s.key, s.status) for s in fake_kimi.requests if s.path.startswith(MESSAGES_PATH)]
    assert messages == [(limited, 429), (serving, 200)], (messages, proxy.output())
    # ...and Claude Code saw that answer's events as Kimi wrote them, not all at once.
    arrived = [at for at, line in lines if line.get("type") == "stream_event"]
    assert len(arrived) >= 6, lines
    assert arrived[-1] - arrived[0] > 4 * EVENT_DELAY_S * 0.8, arrived


OPENCODE = "opencode-ai@1.18.33"


@pytest.fixture(scope="session")
def opencode(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return npm_install(tmp_path_factory, OPENCODE) / "node_modules" / ".bin" / "opencode"


def run_opencode(opencode: Path, work: Path, base_url: str, env: dict[str, str]) -> tuple[int, list[dict], str]:
    """`opencode run --format json` in a project whose config points the anthropic
    provider at `base_url`: its exit status, its JSON events, its stderr."""
    project = work / "project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "opencode.json").write_text(json.dumps({
        "provider": {"anthropic": {"options": {"baseURL": base_url, "apiKey": "sk-kimi-placeholder"}}},
        "model": "anthropic/claude-sonnet-4-5",
    }))
    full_env = {
        "PATH": os.environ["PATH"], "HOME": str(work / "home"), "XDG_CONFIG_HOME": str(work / "config"),
        "XDG_DATA_HOME": str(work / "data"), "XDG_CACHE_HOME": str(work / "cache"),
        "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1", "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1", **env,
    }
    done = subprocess.run([str(opencode), "run", "--format", "json", "--pure", "say hi"], env=full_env, cwd=project,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip().startswith("{")]
    return done.returncode, events, done.stderr


@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_opencode_takes_a_retried_answer(mode, opencode, fake_kimi, keys, write_accounts, start_proxy, tmp_path):
    """OpenCode (Bun's fetch, the AI SDK's stream parser) takes the answer the proxy relays
    into its held response as its own. Its output shows a text part only once whole, so
    the event-by-event timing is checked with Claude Code above."""
    limited, serving = keys[:2]
    write_accounts([limited, serving], "sticky")
    fake_kimi.set_kimi_error(limited, "too_many_requests")
    fake_kimi.event_delay = EVENT_DELAY_S / 3
    proxy = start_proxy(fake_kimi, mode)
    if mode == "reverse":
        base, env = proxy.url + "/coding/v1", {}
    else:
        base = "https://api.kimi.com/coding/v1"
        env = {"HTTPS_PROXY": proxy.url, "NODE_EXTRA_CA_CERTS": str(proxy.ca_cert)}
    status, events, stderr = run_opencode(opencode, tmp_path, base, env)
    assert status == 0, (stderr[-2000:], proxy.output())
    texts = [e["part"]["text"] for e in events if e.get("type") == "text"]
    assert texts and texts[0].startswith("hello from fake kimi #"), (events, stderr[-2000:])
    messages = [(s.key, s.status) for s in fake_kimi.requests if s.path.startswith(MESSAGES_PATH)]
    assert messages[:2] == [(limited, 429), (serving, 200)], (messages, proxy.output())
    assert "has crashed" not in proxy.output()
