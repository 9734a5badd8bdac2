"""npm packages the tests run under Node (the plugin's zod and proper-lockfile, the real
Claude Code and OpenCode), each installed once per session into a temporary folder.
Without node and npm the tests that need them fail, never skip: CI installs both."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def npm_install(tmp_path_factory: pytest.TempPathFactory, *packages: str) -> Path:
    """A fresh folder with `packages` installed (its node_modules), for one session."""
    npm = shutil.which("npm")
    if not shutil.which("node") or not npm:
        pytest.fail("these tests need node and npm on PATH (apt-get install nodejs npm)")
    folder = tmp_path_factory.mktemp(packages[0].lstrip("@").split("@")[0].replace("/", "-"))
    done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", *packages],
                          cwd=folder, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"npm install {' '.join(packages)} failed: {done.stderr.strip()[-2000:]}")
    return folder
