"""What an answer spent, in Kimi's own words: the token counts of its `usage`.

`rotator.tokens.usage` owns the count (`Usage`: all input, output, the part of the
input served from the prompt cache, the part written to it), the two answer shapes
(`Shape`), and reading a whole JSON answer. `rotator.tokens.scan` owns reading a
streamed answer as it passes (`UsageScanner`) without buffering it;
`rotator.tokens.figures` what one of its events says. Pure: no
mitmproxy, no I/O, nothing from the rest of the package, so the proxy, the stores and
the CLI can all use it.
"""

from __future__ import annotations

from rotator.tokens.scan import UsageScanner, from_event_stream
from rotator.tokens.usage import MAX_TOKENS, Shape, Usage, from_json_answer, shape_for_path

__all__ = ["MAX_TOKENS", "Shape", "Usage", "UsageScanner", "from_event_stream", "from_json_answer",
           "shape_for_path"]
