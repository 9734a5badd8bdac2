"""Answers the proxy gives itself, in the Anthropic error shape clients understand."""

from __future__ import annotations

import json

from mitmproxy import http


def anthropic_error(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> http.Response:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    all_headers = {"content-type": "application/json", **(headers or {})}
    return http.Response.make(status, json.dumps(body).encode(), all_headers)
