"""kimi-rotator: one Kimi API key pool behind a mitmproxy addon."""

__version__ = "0.1.0"
