"""Which hub events become which CloudEvents, about which subject, for which subscription.

Pure: the outbox calls these with an event's fields and stores what they return.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from cloudevents.conversion import to_json
from cloudevents.http import CloudEvent

from manifests.errors import ConfigError
from manifests.states import ServiceState

#: ``source`` of every CloudEvent the hub sends.
SOURCE = "/edgepack/hub"
PREFIX = "edgepack."

#: The event log's kinds (``Event.kind``) that are sent, and as which CloudEvents type.
#: A kind with a dot in it (``alert.fired``) is already CloudEvents-style and is sent as
#: ``edgepack.<kind>``; other kinds (a rejected message, a throttled device) stay in the log.
TYPES: dict[str, str] = {
    "model_registered": "edgepack.model.registered",
    "model_deleted": "edgepack.model.deleted",
    "module_pushed": "edgepack.module.pushed",
    "module_deleted": "edgepack.module.deleted",
    "deploy": "edgepack.deployment.created",
    "redeploy": "edgepack.deployment.updated",
    "rollback": "edgepack.deployment.updated",
    "undeploy": "edgepack.deployment.deleted",
    "deployed": "edgepack.service.state-changed",
    "healthy": "edgepack.service.state-changed",
    "failed": "edgepack.service.state-changed",
    "unhealthy": "edgepack.service.state-changed",
    "unschedulable": "edgepack.service.state-changed",
    "transitioning": "edgepack.service.state-changed",
    "removed": "edgepack.service.state-changed",
    # a service's roll-up over its devices (cloud_hub/ingest/rollups.py), about services/NAME
    **{f"service_{s.value.lower()}": "edgepack.service.state-changed" for s in ServiceState},
    "enrolled": "edgepack.device.enrolled",
    "revoked": "edgepack.device.revoked",
    "online": "edgepack.device.online",
    "offline": "edgepack.device.offline",
    "data.batch-received": "edgepack.data.batch-received",
}

#: A service's rollout (cloud_hub.rollouts), about services/NAME.
ROLLOUT_TYPES = frozenset(
    f"edgepack.rollout.{step}" for step in ("wave-started", "promoted", "halted", "completed", "aborted")
)
#: A device's credentials rotation (cloud_hub.fleet.rotation), about devices/ID.
CREDENTIAL_TYPES = frozenset(
    f"edgepack.device.{step}" for step in ("rotation-requested", "credentials-rotated", "rotation-refused")
)
#: Every type a subscription may ask for (plus any ``edgepack.alert.*``).
KNOWN_TYPES = (
    frozenset(TYPES.values())
    | {"edgepack.alert.fired", "edgepack.alert.resolved"}
    | ROLLOUT_TYPES
    | CREDENTIAL_TYPES
)
FILTER_KEYS = ("service", "device")
MAX_URL_CHARS = 2048
MAX_EVENT_TYPES = 50


def event_type(kind: str) -> str | None:
    """The CloudEvents type of an event-log kind, or None when the kind is not sent."""
    if kind in TYPES:
        return TYPES[kind]
    return PREFIX + kind if "." in kind else None


def subject_of(kind: str, device_id: str | None, service: str | None) -> str:
    """What an event is about; deliveries to one subscription go out in order per subject."""
    if service and device_id:
        return f"services/{service}/devices/{device_id}"
    if service:
        return f"services/{service}"
    if device_id:
        return f"devices/{device_id}"
    return kind.split("_", 1)[0].split(".", 1)[0] + "s"


def wanted(
    events: Sequence[str], filters: Mapping[str, str], type_: str, device_id: str | None, service: str | None
) -> bool:
    if events and type_ not in events:
        return False
    if "service" in filters and filters["service"] != service:
        return False
    return not ("device" in filters and filters["device"] != device_id)


@dataclass(frozen=True)
class Envelope:
    message_id: str
    subject: str
    body: str


def envelope(
    *,
    event_id: int,
    kind: str,
    type_: str,
    message: str,
    at: datetime,
    device_id: str | None,
    service: str | None,
) -> Envelope:
    """The CloudEvents 1.0 JSON (structured mode) of one event."""
    message_id = "evt_" + uuid.uuid4().hex
    subject = subject_of(kind, device_id, service)
    data: dict[str, object] = {"eventId": event_id, "kind": kind, "message": message}
    if device_id is not None:
        data["device"] = device_id
    if service is not None:
        data["service"] = service
    attributes = {
        "type": type_,
        "source": SOURCE,
        "id": message_id,
        "subject": subject,
        "time": at.isoformat(),
        "datacontenttype": "application/json",
    }
    return Envelope(message_id, subject, to_json(CloudEvent(attributes, data)).decode())


def check_url(url: str) -> str:
    """An http(s) URL with a host, of bounded length: what a subscription may call."""
    if len(url) > MAX_URL_CHARS:
        raise ConfigError(f"webhook URL has {len(url)} characters; at most {MAX_URL_CHARS}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"webhook URL {url[:200]!r}: give an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ConfigError("webhook URL: no user or password in the URL (the hub signs each delivery)")
    return url


def check_types(events: Sequence[str]) -> list[str]:
    """Full type names (``model.registered`` → ``edgepack.model.registered``), each known."""
    if len(events) > MAX_EVENT_TYPES:
        raise ConfigError(f"{len(events)} event types; at most {MAX_EVENT_TYPES}")
    out: list[str] = []
    for name in events:
        full = name if name.startswith(PREFIX) else PREFIX + name
        if full not in KNOWN_TYPES and not full.startswith(PREFIX + "alert."):
            known = ", ".join(sorted(t.removeprefix(PREFIX) for t in KNOWN_TYPES))
            raise ConfigError(f"unknown event type {name[:100]!r}; known: {known}")
        if full not in out:
            out.append(full)
    return out


def check_filters(filters: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in filters.items():
        if key not in FILTER_KEYS:
            raise ConfigError(f"unknown webhook filter {key[:50]!r}; use service=NAME or device=ID")
        if not value or len(value) > 64:
            raise ConfigError(f"webhook filter {key}: give a value of 1 to 64 characters")
        out[key] = value
    return out
