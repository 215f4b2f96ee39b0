"""MQTT topic names (DESIGN.md fixes them)."""

from __future__ import annotations

DEFAULT_PREFIX = "edgepack"
CHANNELS = ("desired", "reported", "telemetry", "online")


def device_topic(device_id: str, channel: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    return f"{prefix}/devices/{device_id}/{channel}"


def parse_device_topic(topic: str, *, prefix: str = DEFAULT_PREFIX) -> tuple[str, str] | None:
    """``(device_id, channel)`` for a device topic under ``prefix``, else None."""
    head = f"{prefix}/devices/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head) :].split("/")
    if len(rest) != 2 or rest[1] not in CHANNELS or not rest[0]:
        return None
    return rest[0], rest[1]
