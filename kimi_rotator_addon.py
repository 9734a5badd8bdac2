"""Entry point for `mitmdump -s kimi_rotator_addon.py`: loads the kimi-rotator addon.

Works from a checkout whether or not the package is installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rotator.proxy.addon import KimiRotator  # noqa: E402
from rotator.proxy.script_module import hooks_as_none  # noqa: E402

addons = [KimiRotator()]
hooks_as_none(globals())  # mitmproxy looks every hook up here too: a miss costs (rotator.proxy.script_module)
