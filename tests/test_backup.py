"""export-keys and import-keys: the plugin's encrypted backup format, both ways.

The plugin's algorithm is written here independently (hashlib.scrypt and AESGCM, the
tag stored before the ciphertext), and also run as the plugin runs it, with Node's
crypto (scryptSync, aes-256-gcm): Node must be installed, and these tests fail without it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.support.harness import run_cli

PASSWORD = "correct horse"
KEY_A = "sk-kimi-" + "A" * 48
KEY_B = "sk-kimi-" + "B" * 48
KEY_C = "sk-kimi-" + "C" * 48

# The plugin's bin/cli.js encryptData / decryptData, as it runs them.
NODE_SCRIPT = r"""
const { createCipheriv, createDecipheriv, randomBytes, scryptSync } = require('crypto');
const fs = require('fs');
const [mode, password, input, output] = process.argv.slice(2);
if (mode === 'encrypt') {
  const salt = randomBytes(32), iv = randomBytes(16);
  const key = scryptSync(password, salt, 32);
  const cipher = createCipheriv('aes-256-gcm', key, iv);
  const encrypted = Buffer.concat([cipher.update(fs.readFileSync(input, 'utf-8'), 'utf-8'), cipher.final()]);
  fs.writeFileSync(output, Buffer.concat([salt, iv, cipher.getAuthTag(), encrypted]).toString('base64'), 'utf-8');
} else {
  const data = Buffer.from(fs.readFileSync(input, 'utf-8'), 'base64');
  const key = scryptSync(password, data.subarray(0, 32), 32);
  const decipher = createDecipheriv('aes-256-gcm', key, data.subarray(32, 48));
  decipher.setAuthTag(data.subarray(48, 64));
  const out = Buffer.concat([decipher.update(data.subarray(64)), decipher.final()]);
  fs.writeFileSync(output, out.toString('utf-8'), 'utf-8');
}
"""


def plugin_account(key: str, name: str, total: int) -> dict:
    """An account as the plugin's schema (src/types.ts) holds it, every field present."""
    return {
        "key": key, "name": name, "addedAt": 1_700_000_000_000, "lastUsed": 1_700_000_500_000,
        "rateLimitResetTime": 0, "billingLimitResetTime": 1_900_000_000_000, "healthScore": 84,
        "consecutiveFailures": 1, "consecutiveBillingLimitHits": 2, "totalRequests": total,
        "successfulRequests": max(total - 3, 0), "responseTimes": [120, 340, 95],
        "dailyRequests": {"2026-12-01": 7, "2026-12-02": 4},
    }


def plugin_export(accounts: list[dict], strategy: str = "sticky") -> bytes:
    return json.dumps({
        "version": 1, "exportedAt": "2026-12-02T03:00:00.000Z", "accounts": accounts,
        "rotationStrategy": strategy, "autoRefreshHealth": False, "healthRefreshCooldownMinutes": 45,
    }).encode()


def plugin_encrypt(plaintext: bytes, password: str) -> str:
    salt, iv = os.urandom(32), os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=16384, r=8, p=1, dklen=32, maxmem=64 << 20)
    sealed = AESGCM(key).encrypt(iv, plaintext, None)
    return base64.b64encode(salt + iv + sealed[-16:] + sealed[:-16]).decode()


def plugin_decrypt(text: str, password: str) -> dict:
    data = base64.b64decode(text)
    salt, iv, tag, ciphertext = data[:32], data[32:48], data[48:64], data[64:]
    key = hashlib.scrypt(password.encode(), salt=salt, n=16384, r=8, p=1, dklen=32, maxmem=64 << 20)
    return json.loads(AESGCM(key).decrypt(iv, ciphertext + tag, None))


def node(tmp_path: Path, mode: str, password: str, source: Path, target: Path) -> None:
    exe = shutil.which("node")
    assert exe, "node is not installed: these tests run the plugin's algorithm with it (apt-get install nodejs)"
    script = tmp_path / "plugin_crypto.js"
    script.write_text(NODE_SCRIPT)
    subprocess.run([exe, str(script), mode, password, str(source), str(target)], check=True, timeout=60)


def cli(accounts: Path, *args: str, stdin: str | None = None):
    return run_cli(accounts, *args, stdin=stdin, in_process=True)


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """An accounts file with two keys, traffic counted, an unknown field, strategy sticky."""
    path = tmp_path / "kimi-accounts.json"
    doc = {"version": 1, "activeIndex": 1, "rotationStrategy": "sticky",
           "accounts": [plugin_account(KEY_A, "Personal", 50), plugin_account(KEY_B, "Work", 9)],
           "futureSetting": {"kept": True}}
    doc["accounts"][0]["somethingNew"] = "kept"
    path.write_text(json.dumps(doc))
    return path


def assert_refused(done, *files: Path, before: dict[Path, bytes | None]) -> None:
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for path in files:
        assert (path.read_bytes() if path.exists() else None) == before[path]


# ------------------------------------------------------------------------------ export


def test_export_decrypts_with_the_plugins_algorithm(pool: Path, tmp_path: Path) -> None:
    backup = tmp_path / "keys.enc"
    done = cli(pool, "export-keys", str(backup), stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert f"Exported 2 keys to: {backup}" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr
    assert KEY_A not in done.stdout + done.stderr
    assert backup.stat().st_mode & 0o777 == 0o600
    doc = plugin_decrypt(backup.read_text(), PASSWORD)
    assert doc["version"] == 1
    assert doc["exportedAt"].endswith("Z") and doc["exportedAt"][10] == "T"
    assert doc["rotationStrategy"] == "sticky"
    assert doc["autoRefreshHealth"] is True and doc["healthRefreshCooldownMinutes"] == 30
    first = doc["accounts"][0]
    for field, value in plugin_account(KEY_A, "Personal", 50).items():
        assert first[field] == value, field
    assert first["somethingNew"] == "kept"
    assert [a["key"] for a in doc["accounts"]] == [KEY_A, KEY_B]


@pytest.mark.slow
def test_export_decrypts_with_node_running_the_plugins_code(pool: Path, tmp_path: Path) -> None:
    backup = tmp_path / "keys.enc"
    assert cli(pool, "export-keys", str(backup), stdin=PASSWORD + "\n").returncode == 0
    node(tmp_path, "decrypt", PASSWORD, backup, tmp_path / "plain.json")
    doc = json.loads((tmp_path / "plain.json").read_text())
    assert [a["totalRequests"] for a in doc["accounts"]] == [50, 9]


def test_export_default_file_and_no_overwrite_without_force(pool: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    default = tmp_path / "kimi-keys-backup.json.enc"
    assert cli(pool, "export-keys", stdin=PASSWORD + "\n").returncode == 0
    first = default.read_bytes()
    before = {default: first, pool: pool.read_bytes()}
    assert_refused(cli(pool, "export-keys", stdin=PASSWORD + "\n"), default, pool, before=before)
    done = cli(pool, "export-keys", "--force", stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert default.read_bytes() != first and default.stat().st_mode & 0o777 == 0o600
    assert len(plugin_decrypt(default.read_text(), PASSWORD)["accounts"]) == 2


def test_export_refuses_a_short_or_missing_password(pool: Path, tmp_path: Path) -> None:
    backup = tmp_path / "keys.enc"
    before = {backup: None, pool: pool.read_bytes()}
    done = cli(pool, "export-keys", str(backup), stdin="short\n")
    assert_refused(done, backup, pool, before=before)
    assert "at least 8 characters" in done.stderr
    assert_refused(cli(pool, "export-keys", str(backup), stdin=""), backup, pool, before=before)
    assert list(tmp_path.glob(".keys.enc*")) == []


def test_export_at_a_terminal_asks_twice_without_echo(pool: Path, tmp_path: Path, monkeypatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    answers = iter([PASSWORD, PASSWORD + "x"])
    prompts: list[str] = []
    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or next(answers))
    backup = tmp_path / "keys.enc"
    done = cli(pool, "export-keys", str(backup))
    assert_refused(done, backup, before={backup: None})
    assert "do not match" in done.stderr
    assert prompts == ["Enter encryption password: ", "Confirm encryption password: "]
    answers = iter([PASSWORD, PASSWORD])
    assert cli(pool, "export-keys", str(backup)).returncode == 0
    assert len(plugin_decrypt(backup.read_text(), PASSWORD)["accounts"]) == 2


def test_a_short_password_at_a_terminal_is_refused_before_it_is_asked_again(pool: Path, tmp_path: Path,
                                                                            monkeypatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    prompts: list[str] = []
    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or "short")
    backup = tmp_path / "keys.enc"
    done = cli(pool, "export-keys", str(backup))
    assert_refused(done, backup, before={backup: None})
    assert done.returncode == 2 and "at least 8 characters" in done.stderr
    assert prompts == ["Enter encryption password: "]  # not typed twice to hear it was too short


# ------------------------------------------------------------------------------ import


def test_a_backup_made_as_the_plugin_makes_it_imports(tmp_path: Path) -> None:
    accounts = tmp_path / "new.json"
    backup = tmp_path / "plugin.enc"
    backup.write_text(plugin_encrypt(plugin_export([plugin_account(KEY_A, "Personal", 50),
                                                    plugin_account(KEY_B, "Work", 9)]), PASSWORD))
    done = cli(accounts, "import-keys", str(backup), stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert "Imported: 2 key(s)" in done.stdout and "Skipped (duplicates): 0 key(s)" in done.stdout
    assert "Restored rotation strategy: sticky" in done.stdout
    assert PASSWORD not in done.stdout + done.stderr and KEY_A not in done.stdout
    doc = json.loads(accounts.read_text())
    assert doc["rotationStrategy"] == "sticky"
    assert doc["autoRefreshHealth"] is False and doc["healthRefreshCooldownMinutes"] == 45
    first = doc["accounts"][0]
    for field, value in plugin_account(KEY_A, "Personal", 50).items():
        assert first[field] == value, field
    listed = cli(accounts, "list-keys", "--json")
    assert [a["name"] for a in json.loads(listed.stdout)["accounts"]] == ["Personal", "Work"]


@pytest.mark.slow
def test_a_backup_made_by_node_running_the_plugins_code_imports(tmp_path: Path) -> None:
    plain, backup, accounts = tmp_path / "plain.json", tmp_path / "plugin.enc", tmp_path / "new.json"
    plain.write_bytes(plugin_export([plugin_account(KEY_C, "Node", 12)], "round-robin"))
    node(tmp_path, "encrypt", PASSWORD, plain, backup)
    done = cli(accounts, "import-keys", str(backup), stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    doc = json.loads(accounts.read_text())
    assert [(a["key"], a["totalRequests"]) for a in doc["accounts"]] == [(KEY_C, 12)]
    assert doc["rotationStrategy"] == "round-robin"


def test_round_trip_through_our_export_and_import(pool: Path, tmp_path: Path) -> None:
    backup, accounts = tmp_path / "keys.enc", tmp_path / "new.json"
    assert cli(pool, "export-keys", str(backup), stdin=PASSWORD + "\n").returncode == 0
    assert cli(accounts, "import-keys", str(backup), stdin=PASSWORD + "\n").returncode == 0
    old, new = json.loads(pool.read_text()), json.loads(accounts.read_text())
    assert len(new["accounts"]) == len(old["accounts"]) == 2
    for was, now in zip(old["accounts"], new["accounts"]):
        assert {field: now.get(field) for field in was} == was  # every field, unknown ones too
    assert new["rotationStrategy"] == "sticky"


def test_keys_already_present_are_skipped_and_counted(pool: Path, tmp_path: Path) -> None:
    backup = tmp_path / "plugin.enc"
    backup.write_text(plugin_encrypt(plugin_export([plugin_account(KEY_A, "Dup", 1),
                                                    plugin_account(KEY_C, "New", 3),
                                                    plugin_account(KEY_C, "New again", 4)],
                                                   "round-robin"), PASSWORD))
    done = cli(pool, "import-keys", str(backup), stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert "Imported: 1 key(s)" in done.stdout and "Skipped (duplicates): 2 key(s)" in done.stdout
    doc = json.loads(pool.read_text())
    assert [(a["name"], a["totalRequests"]) for a in doc["accounts"]] == [("Personal", 50), ("Work", 9), ("New", 3)]
    assert doc["futureSetting"] == {"kept": True}


def test_nothing_new_leaves_the_file_and_strategy_alone(pool: Path, tmp_path: Path) -> None:
    backup = tmp_path / "plugin.enc"
    backup.write_text(plugin_encrypt(plugin_export([plugin_account(KEY_A, "Dup", 1)], "round-robin"), PASSWORD))
    before = pool.read_bytes()
    done = cli(pool, "import-keys", str(backup), stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert "Imported: 0 key(s)" in done.stdout and "Restored" not in done.stdout
    assert pool.read_bytes() == before


def test_the_plugins_plain_accounts_file_imports_without_a_password(pool: Path, tmp_path: Path) -> None:
    accounts = tmp_path / "mine.json"
    done = cli(accounts, "import-keys", str(pool), stdin="")
    assert done.returncode == 0, done.stderr
    doc = json.loads(accounts.read_text())
    assert [a["key"] for a in doc["accounts"]] == [KEY_A, KEY_B]
    assert doc["accounts"][0]["dailyRequests"] == {"2026-12-01": 7, "2026-12-02": 4}
    assert doc["accounts"][0]["somethingNew"] == "kept"
    assert doc["rotationStrategy"] == "sticky"


def _existing(tmp_path: Path) -> Path:
    accounts = tmp_path / "have.json"
    assert cli(accounts, "add-key", KEY_C, "Mine").returncode == 0
    return accounts


@pytest.mark.parametrize("case", ["wrong password", "truncated", "flipped byte", "base64 garbage",
                                  "not a backup", "json without accounts", "encrypted non-json",
                                  "future version", "missing"])
def test_a_bad_backup_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    good = plugin_encrypt(plugin_export([plugin_account(KEY_A, "Personal", 5)]), PASSWORD)
    raw = base64.b64decode(good)
    contents = {
        "wrong password": good,
        "truncated": base64.b64encode(raw[:60]).decode(),
        "flipped byte": base64.b64encode(raw[:70] + bytes([raw[70] ^ 1]) + raw[71:]).decode(),
        "base64 garbage": "this is *not* base64 at all!",
        "not a backup": "hello\n",
        "json without accounts": '{"version": 1}',
        "encrypted non-json": plugin_encrypt(b"not json", PASSWORD),
        "future version": plugin_encrypt(b'{"version": 2, "accounts": []}', PASSWORD),
    }
    backup = tmp_path / "backup.enc"
    if case in contents:
        backup.write_text(contents[case])
    password = "wrong password" if case == "wrong password" else PASSWORD
    have, fresh = _existing(tmp_path), tmp_path / "fresh.json"
    before = {have: have.read_bytes(), fresh: None}
    for accounts in (have, fresh):
        done = cli(accounts, "import-keys", str(backup), stdin=password + "\n")
        assert_refused(done, have, fresh, before=before)
        assert done.returncode == 1  # the file is what is wrong, not how it was asked for
        assert KEY_A not in done.stderr and PASSWORD not in done.stderr
    said = {
        "wrong password": "wrong password, or the file is damaged",
        "truncated": "truncated",
        "flipped byte": "wrong password, or the file is damaged",
        "base64 garbage": "neither an accounts file (JSON) nor base64",
        "not a backup": "neither an accounts file (JSON) nor base64",
        "json without accounts": "holds no list of accounts",
        "encrypted non-json": "is not valid JSON",
        "future version": "has version 2; this kimi-rotator reads version 1",
        "missing": "cannot read",
    }
    assert said[case] in done.stderr


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain file", "backup"])
@pytest.mark.parametrize("bad_key", [KEY_B + "\r\n", KEY_B[:30] + "\r\nX-Injected: 1", "sk-kimi-" + "B" * 20 + " B"],
                         ids=["CRLF at the end", "CRLF inside", "a space"])
def test_a_key_add_key_would_refuse_is_refused_and_nothing_imported(tmp_path: Path, encrypted: bool,
                                                                      bad_key: str) -> None:
    document = plugin_export([plugin_account(KEY_A, "Personal", 5), plugin_account(bad_key, "Work\nline", 9)])
    source = tmp_path / "import.src"
    source.write_text(plugin_encrypt(document, PASSWORD) if encrypted else document.decode())
    have, fresh = _existing(tmp_path), tmp_path / "fresh.json"
    before = {have: have.read_bytes(), fresh: None}
    for accounts in (have, fresh):
        done = cli(accounts, "import-keys", str(source), stdin=PASSWORD + "\n")
        assert_refused(done, have, fresh, before=before)  # one line, nothing written, not even key A
        assert "Imported" not in done.stdout
        assert 'at accounts.1 ("Work line"): not a Kimi API key (they start with sk-kimi-; got sk-kim…' in done.stderr
        assert ("line break" if "\n" in bad_key else "space") in done.stderr, done.stderr
        assert bad_key.strip() not in done.stderr and KEY_B[8:-4] not in done.stderr and KEY_A not in done.stderr


def test_export_with_no_keys_writes_nothing(tmp_path: Path) -> None:
    backup = tmp_path / "keys.enc"
    done = cli(tmp_path / "empty.json", "export-keys", str(backup), stdin=PASSWORD + "\n")
    assert done.returncode == 0 and "No keys to export." in done.stdout
    assert not backup.exists()


def test_import_at_a_terminal_asks_once_without_echo(tmp_path: Path, monkeypatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    prompts: list[str] = []
    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or PASSWORD)
    backup, accounts = tmp_path / "plugin.enc", tmp_path / "new.json"
    backup.write_text(plugin_encrypt(plugin_export([plugin_account(KEY_A, "Personal", 5)]), PASSWORD))
    done = cli(accounts, "import-keys", str(backup))
    assert done.returncode == 0, done.stderr
    assert prompts == ["Enter decryption password: "]
    assert [a["key"] for a in json.loads(accounts.read_text())["accounts"]] == [KEY_A]


@pytest.mark.slow
def test_passwords_piped_to_the_real_command(pool: Path, tmp_path: Path) -> None:
    backup, accounts = tmp_path / "keys.enc", tmp_path / "new.json"
    done = run_cli(pool, "export-keys", str(backup), stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    done = run_cli(accounts, "import-keys", str(backup), stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert "Imported: 2 key(s)" in done.stdout
