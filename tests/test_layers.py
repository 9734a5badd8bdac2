"""The package's layers, as pyproject.toml states them ([tool.importlinter]): import-linter
reads every module's imports (it runs none of them) and each contract must hold.

In process, through import-linter's own use case (its command line would reconfigure this
process's logging); no cache is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from importlinter import api
from importlinter.application import use_cases

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_the_contracts_are_stated() -> None:
    contracts = {c["id"]: c for c in api.read_configuration(str(PYPROJECT))["contracts_options"]}
    assert set(contracts) == {"layers", "request-path", "mitmproxy"}
    layers = contracts["layers"]["layers"]
    assert layers[0].replace(" ", "") == "cli|proxy" and layers[-1].split(" | ")[0] == "core"


def test_every_import_keeps_the_layers(capsys: pytest.CaptureFixture[str]) -> None:
    kept = use_cases.lint_imports(config_filename=str(PYPROJECT), cache_dir=None, no_logo=True)
    assert kept, capsys.readouterr().out
