"""Entry point for `mitmdump -s kimi_rotator_addon.py`: loads the kimi-rotator addon.

Works from a checkout whether or not the package is installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rotator.proxy.addon import KimiRotator  # noqa: E402

addons = [KimiRotator()]
