"""Device records: enrolment with one-time credentials, tags, revocation.

These functions change rows inside a transaction that :func:`cloud_hub.fleet.desired.change_fleet`
opened (which re-issues the desired states they affect). The device's MQTT password and HTTP
token are shown once; only a Mosquitto-format hash and a sha256 are kept.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from cloud_hub.broker.passwords import hash_password, rabbit_hash
from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.events import record_event
from cloud_hub.fleet.tables import Device, DeviceDesired
from cloud_hub.fleet.targeting import check_device_id, check_tags, format_selector
from manifests.desired import check_tag_count
from manifests.errors import ConfigError

TOKEN_PREFIX = "ep_dev_"
#: Devices one bulk enrolment may hold: its answer (every device's credentials) is one body.
MAX_BULK = 20_000


@dataclass(frozen=True)
class Credentials:
    device_id: str
    mqtt_username: str
    mqtt_password: str
    token: str


def token_hash(token: str) -> str:
    # The token has 256 bits of entropy, so an unsalted fast hash is enough and allows a lookup.
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(hashed: str) -> ColumnElement[bool]:
    """The active device whose current token, or whose new one while a credentials rotation
    is in flight, hashes to ``hashed`` (both work until the device confirms the new one)."""
    return or_(Device.token_hash == hashed, Device.next_token_hash == hashed) & Device.revoked.is_(False)


def new_credentials(device_id: str) -> Credentials:
    return Credentials(
        device_id=device_id,
        mqtt_username=device_id,
        mqtt_password=secrets.token_urlsafe(24),
        token=TOKEN_PREFIX + secrets.token_urlsafe(32),
    )


def clear_rotation(device: Device) -> None:
    """No rotation in flight and no new credentials (``rotation_issued`` stays: replays)."""
    device.rotation_requested = None
    device.next_token_hash = None
    device.next_mqtt_password_hash = None
    device.next_rabbitmq_password_hash = None
    device.next_public_key = None


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
    device = session.get(Device, device_id)
    if device is not None and not device.revoked:
        raise Conflict(f"device {device_id!r} is already enrolled; revoke it first to issue new credentials")
    return _enroll(session, device, device_id, tags)


@dataclass(frozen=True)
class Enrolment:
    """One device of a bulk enrolment: its id and tags."""

    device_id: str
    tags: Mapping[str, str]


def check_enrolments(entries: Sequence[Enrolment], *, reserved: str | None = None) -> list[Enrolment]:
    """Every entry's id and tags checked, and no id twice; the first bad one refuses them all.

    Pure. Messages name the entry by its position (1 = the first), so a caller holding a file
    can name the row. ``reserved`` is an id no device may take (the hub's own broker user).
    """
    if not entries:
        raise ConfigError("no devices to enroll")
    if len(entries) > MAX_BULK:
        raise ConfigError(f"{len(entries)} devices in one enrolment; at most {MAX_BULK}, split the list")
    seen: dict[str, int] = {}
    out = []
    for number, entry in enumerate(entries, 1):
        try:
            check_device_id(entry.device_id)
            tags = check_tags(entry.tags)
        except ConfigError as exc:
            raise ConfigError(f"entry {number}: {exc}") from None
        if entry.device_id == reserved:
            raise ConfigError(f"entry {number}: device id {entry.device_id!r} is the hub's broker user name")
        if entry.device_id in seen:
            first = seen[entry.device_id]
            raise ConfigError(
                f"entry {number}: device {entry.device_id!r} is listed twice (first as entry {first})"
            )
        seen[entry.device_id] = number
        out.append(Enrolment(entry.device_id, tags))
    return out


def enroll_devices(session: Session, entries: Sequence[Enrolment]) -> list[Credentials]:
    """Enroll every entry (checked with :func:`check_enrolments`) or none.

    One query finds the devices already known; one that is enrolled and not revoked refuses
    the whole list (a :class:`Conflict` naming it) before anything is changed.
    """
    ids = [e.device_id for e in entries]
    known: dict[str, Device] = {}
    for start in range(0, len(ids), 500):  # bounded IN lists
        chunk = ids[start : start + 500]
        known.update((d.id, d) for d in session.scalars(select(Device).where(Device.id.in_(chunk))))
    for number, entry in enumerate(entries, 1):
        device = known.get(entry.device_id)
        if device is not None and not device.revoked:
            raise Conflict(
                f"entry {number}: device {entry.device_id!r} is already enrolled; revoke it first or "
                "leave it out (nothing was enrolled)"
            )
    return [_enroll(session, known.get(e.device_id), e.device_id, e.tags) for e in entries]


def _enroll(session: Session, device: Device | None, device_id: str, tags: Mapping[str, str]) -> Credentials:
    creds = new_credentials(device_id)
    if device is None:
        device = Device(id=device_id)
        session.add(device)
    else:
        # Enrolled again: its credentials are new now (their age counts from here).
        device.credentials_rotated_at = utcnow()
    device.tags = dict(tags)
    device.mqtt_password_hash = hash_password(creds.mqtt_password)
    device.rabbitmq_password_hash = rabbit_hash(creds.mqtt_password)
    device.token_hash = token_hash(creds.token)
    # Enrolled afresh: the broker user is the device id again (rotations start over).
    device.credentials_generation = 0
    clear_rotation(device)
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
    if len(tags) > len(device.tags or {}):
        # A device tagged before the bound existed may still shed tags, never gain them.
        try:
            check_tag_count(len(tags))
        except ConfigError as exc:
            raise ConfigError(f"device {device_id} would carry {exc}; remove some first") from None
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
    # Mid-rotation the new credentials go too: revocation refuses both at once.
    clear_rotation(device)
    desired = session.get(DeviceDesired, device_id)
    if desired is not None:
        desired.payload = None
        desired.modules_digest = None
        desired.issued = None
        desired.expires = None
    record_event(session, "revoked", f"device {device_id} revoked", device_id=device_id)
    return device
