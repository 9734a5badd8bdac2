"""The addon as an installed kimi-rotator offers it: the script to give mitmdump,
mitmweb or mitmproxy with -s, and mitmdump started with it (`kimi-rotator proxy`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import rotator.script

ADDON_SCRIPT = Path(rotator.script.__file__).resolve().with_name("kimi_rotator_addon.py")


def run_mitmdump(mitmdump_options: Sequence[str]) -> int:
    """mitmdump in this process with the addon loaded first and the person's options
    after it; returns when mitmdump stops (it exits the process on a start-up error).
    It listens on this machine only unless the options say otherwise (mitmdump's own
    default is every interface)."""
    from mitmproxy.tools.main import mitmdump

    mitmdump(["--listen-host", "127.0.0.1", "-s", str(ADDON_SCRIPT), *mitmdump_options])
    return 0
