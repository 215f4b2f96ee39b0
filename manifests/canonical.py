"""Canonical JSON: the exact bytes that signatures cover.

Sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity. Two parties that hold the
same document always produce the same bytes, so a signature made by one verifies at the other.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` (JSON types only) to canonical bytes."""
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")
