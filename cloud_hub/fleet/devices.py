"""Device records: enrolment with one-time credentials, tags, revocation.

These functions change rows inside a transaction that :func:`cloud_hub.fleet.desired.change_fleet`
opened (which re-issues the desired states they affect). The device's MQTT password and HTTP
token are shown once; only a Mosquitto-format hash and a sha256 are kept.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy.orm import Session

from cloud_hub.broker.passwords import hash_password, rabbit_hash
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.events import record_event
from cloud_hub.fleet.tables import Device, DeviceDesired
from cloud_hub.fleet.targeting import check_device_id, format_selector

TOKEN_PREFIX = "ep_dev_"


@dataclass(frozen=True)
class Credentials:
    device_id: str
    mqtt_username: str
    mqtt_password: str
    token: str


def token_hash(token: str) -> str:
    # The token has 256 bits of entropy, so an unsalted fast hash is enough and allows a lookup.
    return hashlib.sha256(token.encode()).hexdigest()


def new_credentials(device_id: str) -> Credentials:
    return Credentials(
        device_id=device_id,
        mqtt_username=device_id,
        mqtt_password=secrets.token_urlsafe(24),
        token=TOKEN_PREFIX + secrets.token_urlsafe(32),
    )


def get_device(session: Session, device_id: str, *, active: bool = False) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} is not enrolled; see 'edgepack device list'")
    if active and device.revoked:
        raise NotFound(f"device {device_id!r} was revoked; enroll it again with 'edgepack device enroll'")
    return device


def enroll_device(session: Session, device_id: str, tags: Mapping[str, str]) -> Credentials:
    """Create the device (or re-enroll a revoked one, with new credentials)."""
    check_device_id(device_id)
    creds = new_credentials(device_id)
    device = session.get(Device, device_id)
    if device is not None and not device.revoked:
        raise Conflict(f"device {device_id!r} is already enrolled; revoke it first to issue new credentials")
    if device is None:
        device = Device(id=device_id)
        session.add(device)
    device.tags = dict(tags)
    device.mqtt_password_hash = hash_password(creds.mqtt_password)
    device.rabbitmq_password_hash = rabbit_hash(creds.mqtt_password)
    device.token_hash = token_hash(creds.token)
    device.revoked = False
    device.online = False
    tag_text = format_selector(tags) or "no tags"
    record_event(session, "enrolled", f"device {device_id} enrolled ({tag_text})", device_id=device_id)
    return creds


def retag_device(
    session: Session,
    device_id: str,
    *,
    set_tags: Mapping[str, str],
    remove: Iterable[str] = (),
    replace: bool = False,
) -> Device:
    device = get_device(session, device_id, active=True)
    tags = {} if replace else dict(device.tags or {})
    for key in remove:
        tags.pop(key, None)
    tags.update(set_tags)
    device.tags = tags
    record_event(
        session,
        "retagged",
        f"device {device_id} tags now {format_selector(tags) or '(none)'}",
        device_id=device_id,
    )
    return device


def revoke_device(session: Session, device_id: str) -> Device:
    """Refuse the device's credentials from now on and withdraw its desired state."""
    device = get_device(session, device_id)
    if device.revoked:
        return device
    device.revoked = True
    device.online = False
    # Nothing can match the token or password any more; the hashes are replaced, not kept.
    device.token_hash = token_hash(secrets.token_urlsafe(32))
    device.mqtt_password_hash = hash_password(secrets.token_urlsafe(32))
    device.rabbitmq_password_hash = None
    desired = session.get(DeviceDesired, device_id)
    if desired is not None:
        desired.payload = None
        desired.modules_digest = None
        desired.issued = None
        desired.expires = None
    record_event(session, "revoked", f"device {device_id} revoked", device_id=device_id)
    return device
