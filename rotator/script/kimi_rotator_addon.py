"""The script for `mitmdump -s` (or mitmweb, mitmproxy) when kimi-rotator is installed
as a package: `kimi-rotator addon-path` prints where it is. A checkout has the same at
its top, kimi_rotator_addon.py."""

from rotator.proxy.addon import KimiRotator
from rotator.proxy.script_module import hooks_as_none

addons = [KimiRotator()]
hooks_as_none(globals())  # mitmproxy looks every hook up here too: a miss costs (rotator.proxy.script_module)
