"""MQTT topic names (``docs/architecture.md`` keeps the table).

Every per-device topic is ``<prefix>/devices/<id>/<channel>``. Which side may use which
channel is part of the contract, because the broker's ACL is generated from it: a device
reads only :data:`DEVICE_READS` and writes only :data:`DEVICE_WRITES` of its own topics.
"""

from __future__ import annotations

DEFAULT_PREFIX = "edgepack"

DESIRED = "desired"  # hub -> device, retained, QoS 1: the signed desired state
REPORTED = "reported"  # device -> hub, retained, QoS 1: the full reported state
TELEMETRY = "telemetry"  # device -> hub, QoS 0: a metrics sample
ONLINE = "online"  # device -> hub (and its last will), retained, QoS 1: true/false
LOGS_REQUEST = "logs-request"  # hub -> device, QoS 1: send me a module's last log lines
LOGS_RESPONSE = "logs-response"  # device -> hub, QoS 1: the lines asked for

#: channels a device subscribes to (published by the hub only)
DEVICE_READS = (DESIRED, LOGS_REQUEST)
#: channels a device publishes to (read by the hub only)
DEVICE_WRITES = (REPORTED, TELEMETRY, ONLINE, LOGS_RESPONSE)
#: the channels ingest stores (the hub's shared subscription across replicas)
INGEST_CHANNELS = (REPORTED, TELEMETRY, ONLINE)
CHANNELS = (*DEVICE_READS, *DEVICE_WRITES)


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
