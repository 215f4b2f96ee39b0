"""How the hub says when a device was last heard from (pure).

A service's state on a device is named by ``cloud_hub/rollup.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime


def seen_text(last_seen: datetime | None) -> str:
    """When a device was last heard from, for a message: ``2026-12-07 12:01:03 UTC`` or never."""
    if last_seen is None:
        return "never"
    aware = last_seen if last_seen.tzinfo is not None else last_seen.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
