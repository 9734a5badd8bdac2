"""The accounts file on disk (rotator.store.file): what it reads, what it writes, and how."""

import json
import os
import stat

import pytest

from rotator.core.models import Account, AccountsFile
from rotator.store import file as storage
from rotator.store.safe_write import is_readable_by_others

PLUGIN_FILE = {
    "version": 1,
    "accounts": [
        {
            "key": "sk-kimi-FAKEpluginkey00000000001",
            "name": "My Account",
            "addedAt": 1734000000000,
            "lastUsed": 1734000500000,
            "rateLimitResetTime": 0,
            "healthScore": 86,
            "consecutiveFailures": 1,
            "totalRequests": 50,
            "successfulRequests": 45,
            "toastShown": True,
        }
    ],
    "activeIndex": 0,
    "rotationStrategy": "sticky",
    "pluginSetting": {"nested": [1, 2]},
}


def test_missing_file_is_an_empty_pool(tmp_path):
    state = storage.read_accounts(tmp_path / "none.json")
    assert state.accounts == [] and state.rotation_strategy == "health-based"


def test_plugin_file_round_trips_with_nothing_lost(tmp_path):
    path = tmp_path / "kimi-accounts.json"
    path.write_text(json.dumps(PLUGIN_FILE))
    state = storage.read_accounts(path)
    assert state.accounts[0].total_requests == 50
    assert state.rotation_strategy == "sticky"
    storage.write_accounts(path, state)
    written = json.loads(path.read_text())
    for field, value in PLUGIN_FILE.items():
        if field != "accounts":
            assert written[field] == value
    for field, value in PLUGIN_FILE["accounts"][0].items():
        assert written["accounts"][0][field] == value


def test_write_is_private(tmp_path):
    path = tmp_path / "fresh" / "sub" / "kimi-accounts.json"
    storage.write_accounts(path, AccountsFile(accounts=[Account(key="sk-kimi-FAKEmode000000000001")]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"{not json", "not valid JSON"),
        (b'{"version": 2, "accounts": []}', "unsupported version 2"),
        (b'{"version": 1, "accounts": [{"name": "no key"}]}', "accounts.0.key"),
        (b'{"version": 1, "rotationStrategy": "random"}', "rotationStrategy"),
        (b"\xff\xfe garbage", "not valid JSON"),
    ],
)
def test_bad_files_raise_a_clear_error_and_are_never_overwritten(tmp_path, content, problem):
    path = tmp_path / "kimi-accounts.json"
    path.write_bytes(content)
    with pytest.raises(storage.AccountsFileError) as caught:
        storage.update_accounts(path, lambda state: state)
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)
    assert path.read_bytes() == content


def test_update_applies_the_change_to_what_is_on_disk_now(tmp_path):
    path = tmp_path / "kimi-accounts.json"
    storage.write_accounts(path, AccountsFile(accounts=[Account(key="sk-kimi-FAKEfirst0000000000001")]))

    def add(state):
        state.accounts.append(Account(key="sk-kimi-FAKEsecond000000000001"))
        return state

    storage.update_accounts(path, add)
    assert [a.key for a in storage.read_accounts(path).accounts] == [
        "sk-kimi-FAKEfirst0000000000001",
        "sk-kimi-FAKEsecond000000000001",
    ]


def test_update_that_changes_nothing_does_not_write(tmp_path):
    path = tmp_path / "kimi-accounts.json"
    storage.write_accounts(path, AccountsFile())
    before = storage.file_signature(path)
    storage.update_accounts(path, lambda state: state)
    storage.update_accounts(path, lambda state: None)
    assert storage.file_signature(path) == before


def test_environment_variable_overrides_the_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv(storage.ACCOUNTS_ENV, str(tmp_path / "elsewhere.json"))
    assert storage.resolve_accounts_path(None) == tmp_path / "elsewhere.json"
    assert storage.resolve_accounts_path(str(tmp_path / "x.json")) == tmp_path / "x.json"


def test_default_path_is_in_the_user_config_folder(monkeypatch):
    monkeypatch.delenv(storage.ACCOUNTS_ENV, raising=False)
    path = storage.default_accounts_path()
    assert path.name == "kimi-accounts.json" and path.parent.name == "kimi-rotator"


def test_group_readable_file_is_noticed(tmp_path):
    path = tmp_path / "kimi-accounts.json"
    storage.write_accounts(path, AccountsFile())
    assert not is_readable_by_others(path)
    os.chmod(path, 0o644)
    assert is_readable_by_others(path)


def test_temp_files_left_by_killed_writers_are_removed_once_stale(tmp_path):
    path = tmp_path / "kimi-accounts.json"
    storage.write_accounts(path, AccountsFile())
    stale = tmp_path / ".kimi-accounts.json.abc123.tmp"
    fresh = tmp_path / ".kimi-accounts.json.def456.tmp"
    for leftover in (stale, fresh):
        leftover.write_text('{"holds": "a key"}')
    old = stale.stat().st_mtime - storage.STALE_TEMP_AGE_S - 5
    os.utime(stale, (old, old))
    storage.update_accounts(path, lambda state: state)
    assert not stale.exists()
    assert fresh.exists()  # could belong to a writer that is still working
