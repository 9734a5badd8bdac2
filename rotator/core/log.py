"""The log level of what a person should see: a key cooling or disabled, a store lost or
back. It is mitmproxy's ALERT, named by value so that nothing here imports mitmproxy;
the status page's timeline keeps the lines logged at it."""

from __future__ import annotations

import logging

ALERT = logging.INFO + 1  # mitmproxy.log.ALERT
