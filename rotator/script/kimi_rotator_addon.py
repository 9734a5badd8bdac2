"""The script for `mitmdump -s` (or mitmweb, mitmproxy) when kimi-rotator is installed
as a package: `kimi-rotator addon-path` prints where it is. A checkout has the same at
its top, kimi_rotator_addon.py."""

from rotator.proxy.addon import KimiRotator

addons = [KimiRotator()]
