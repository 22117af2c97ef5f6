"""The one rule for stream ids (which are also room ids), applied at every entry point.

WHIP, WHEP, placement, the room socket and metrics labels all call `is_valid_stream_id`; a
stream id is 1-64 ASCII letters, digits, '_' or '-' (no dots, so no '..' path tricks, and
nothing that needs escaping in a URL, a Redis key or a Prometheus label).
"""

from __future__ import annotations

import re

STREAM_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
STREAM_ID_RULE = f"stream id must match {STREAM_ID_PATTERN} (1-64 ASCII letters, digits, '_' or '-')"
_STREAM_ID_RE = re.compile(STREAM_ID_PATTERN)


def is_valid_stream_id(value: object) -> bool:
    return isinstance(value, str) and _STREAM_ID_RE.fullmatch(value) is not None
