"""Device messages as data: what a topic + payload means, or why it is refused.

Pure: :func:`parse_message` takes the bytes the broker delivered and returns a typed message
or a :class:`Rejected` verdict that names the problem. Nothing here touches the database.
Fields a newer agent added are dropped, not a reason to refuse its report
(:func:`manifests.compat.parse_lenient`; docs/agent.md, "Upgrading a fleet").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from manifests.compat import parse_lenient
from manifests.reported import ReportedState, Telemetry
from manifests.topics import INGEST_CHANNELS, parse_device_topic

#: Larger payloads are refused before parsing: a reported state is a few KiB.
MAX_PAYLOAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class Reported:
    device_id: str
    state: ReportedState
    retained: bool
    received_at: datetime


@dataclass(frozen=True)
class TelemetryMessage:
    device_id: str
    sample: Telemetry
    retained: bool
    received_at: datetime


@dataclass(frozen=True)
class Online:
    device_id: str
    online: bool
    retained: bool
    received_at: datetime


@dataclass(frozen=True)
class Rejected:
    """A device message that was dropped, and why (recorded as an event)."""

    device_id: str | None
    topic: str
    reason: str


DeviceMessage = Reported | TelemetryMessage | Online


def _validation_reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
    return f"{where}: {first.get('msg', 'invalid')}"


def parse_message(
    topic: str,
    payload: bytes,
    *,
    prefix: str,
    retained: bool,
    received_at: datetime,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> DeviceMessage | Rejected | None:
    """The meaning of one message; None for topics ingest does not handle (or a cleared
    retained message, which carries no state)."""
    parsed = parse_device_topic(topic, prefix=prefix)
    if parsed is None:
        return None
    device_id, channel = parsed
    if channel not in INGEST_CHANNELS or not payload:
        return None
    if len(payload) > max_bytes:
        return Rejected(device_id, topic, f"payload of {len(payload)} bytes exceeds {max_bytes}")
    if channel == "online":
        text = payload.strip().lower()
        if text not in (b"true", b"false"):
            return Rejected(device_id, topic, "online payload must be 'true' or 'false'")
        return Online(device_id, text == b"true", retained, received_at)
    try:
        if channel == "reported":
            state = parse_lenient(ReportedState, payload)
            claimed = state.device_id
            message: DeviceMessage = Reported(device_id, state, retained, received_at)
        else:
            sample = parse_lenient(Telemetry, payload)
            claimed = sample.device_id
            message = TelemetryMessage(device_id, sample, retained, received_at)
    except ValidationError as exc:
        return Rejected(device_id, topic, f"invalid {channel} message: {_validation_reason(exc)}")
    if claimed != device_id:
        # On a broker without the hub's ACL one device could otherwise speak for another.
        return Rejected(device_id, topic, f"{channel} message names device {claimed!r}")
    return message
