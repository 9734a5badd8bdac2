"""kimi-rotator installed the way Python tools are (a wheel in a fresh environment, no
checkout): `addon-path` names a script inside the installed package, and `kimi-rotator
proxy` starts mitmdump with it, which serves a Kimi request with a pool key."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import pytest

from rotator.core.models import Account, AccountsFile
from rotator.store import file as storage
from testbed.processes import LISTEN_RE, REPO_ROOT, Proxy, OutputCollector
from tests.support.accounts import fake_key

pytestmark = pytest.mark.slow  # builds a wheel, makes an environment, starts mitmdump


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel; what the wheel depends on comes from this
    test's own environment (a path entry, without its editable checkout of rotator)."""
    base = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
         str(base / "dist"), str(REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (base / "dist").glob("kimi_rotator-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    purelib = Path(subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, timeout=300, capture_output=True)
    (purelib / "deps-of-the-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")
           and not k.upper().endswith("_PROXY") and not k.startswith("KIMI_ROTATOR")}
    return {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "PYTHONUNBUFFERED": "1"}


def test_addon_path_is_inside_the_installed_package(installed: Path, tmp_path: Path) -> None:
    done = subprocess.run([installed / "bin" / "kimi-rotator", "addon-path"], capture_output=True, text=True,
                          cwd=tmp_path, env=fresh_env(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    script = Path(done.stdout.strip())
    assert script.is_file() and script.name == "kimi_rotator_addon.py"
    assert script.is_relative_to(installed) and not script.is_relative_to(REPO_ROOT)


def test_kimi_rotator_proxy_serves_with_the_installed_addon(installed: Path, tmp_path: Path, fake_kimi) -> None:
    accounts = tmp_path / "accounts.json"
    key = fake_key("wheel")
    storage.write_accounts(accounts, AccountsFile(accounts=[Account(key=key, name="Wheel")]))
    args = [str(installed / "bin" / "kimi-rotator"), "proxy", "-p", "0", "--mode", f"reverse:{fake_kimi.url}",
            "--set", f"confdir={tmp_path / 'mitm'}", "--set", "kimi_hosts=127.0.0.1",
            "--set", f"kimi_accounts={accounts}", "--set", "kimi_status=off", "--set", "kimi_usage_interval=0"]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, cwd=tmp_path, env=fresh_env(tmp_path))
    out = OutputCollector(process.stdout)
    match = out.wait_for(LISTEN_RE, 30)
    proxy = Proxy(process, int(match.group(1)) if match else 0, "", tmp_path / "mitm", args, out)
    try:
        assert match is not None, out.text()
        assert "listening at 127.0.0.1:" in out.text()  # this machine only, unless told otherwise
        answer = httpx.post(f"http://127.0.0.1:{proxy.port}/coding/v1/messages",
                            headers={"x-api-key": "sk-kimi-placeholder"},
                            json={"model": "k2", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                            timeout=30)
        assert answer.status_code == 200, answer.text
        assert [r.key for r in fake_kimi.requests] == [key]
        assert str(installed) in out.text() and str(REPO_ROOT) not in out.text()  # "Loading script <installed>"
    finally:
        proxy.stop()
