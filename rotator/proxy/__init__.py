"""The mitmproxy side of kimi-rotator: the only package that imports mitmproxy."""
