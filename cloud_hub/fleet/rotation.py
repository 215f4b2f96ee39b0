"""Rotating a device's credentials over its current session (docs/enrolment.md).

Three steps, each a transaction of its own that :func:`cloud_hub.fleet.desired.change_fleet`
opens (so the broker's accounts follow the device table):

1. :func:`request_rotation` (the admin): marks the device; one rotation in flight at a time.
2. :func:`accept_request` (the device, with its CURRENT token): the new credentials'
   verifiers are kept beside the current ones and the broker gets the new user, so both work.
3. :func:`confirm_rotation` (the device, with its NEW token, after it switched): the new
   credentials replace the old ones, whose broker user is removed; ``device.credentials-rotated``.

Revoking the device (:func:`cloud_hub.fleet.devices.revoke_device`) clears both at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.errors import Conflict, Unauthorized
from cloud_hub.events import record_event
from cloud_hub.fleet.devices import clear_rotation, get_device
from cloud_hub.fleet.tables import Device
from manifests.rotation import RotationRequest, broker_username

log = logging.getLogger(__name__)

ROTATED = "device.credentials-rotated"
ROTATION_REQUESTED = "device.rotation-requested"
ROTATION_REFUSED = "device.rotation-refused"


def request_rotation(session: Session, device_id: str, *, now: datetime, why: str = "by the admin") -> Device:
    """Mark ``device_id``'s credentials for rotation; :class:`Conflict` if one is in flight."""
    device = get_device(session, device_id, active=True)
    if device.rotation_requested is not None:
        raise Conflict(
            f"a rotation of device {device_id}'s credentials is in flight since "
            f"{device.rotation_requested.isoformat()}; it ends when the device confirms "
            "(or revoke the device)"
        )
    device.rotation_requested = now
    record_event(session, ROTATION_REQUESTED, f"device {device_id}: credentials rotation requested {why}",
                 device_id=device_id)  # fmt: skip
    return device


#: Devices marked in one transaction by the expiry; the rest follow in the next rounds.
EXPIRY_BATCH = 500


def request_due_rotations(session: Session, *, max_age: timedelta, now: datetime) -> list[str]:
    """Mark for rotation the active devices whose credentials are older than ``max_age``
    (since the last rotation, else since enrolment) and that have none in flight, at most
    :data:`EXPIRY_BATCH`; their ids."""
    since = func.coalesce(Device.credentials_rotated_at, Device.created_at)
    due = list(
        session.scalars(
            select(Device.id)
            .where(Device.revoked.is_(False), Device.rotation_requested.is_(None), since < now - max_age)
            .limit(EXPIRY_BATCH)
        )
    )
    why = f"by the hub: credentials older than {max_age.total_seconds() / 86400:g} day(s)"
    for device_id in due:
        request_rotation(session, device_id, now=now, why=why)
    return due


class CredentialExpiry:
    """The upkeep chore of ``credentials_max_age_days``: marks due devices, checking at most
    every tenth of the age (and at least hourly), so a large fleet is not scanned every round."""

    def __init__(self, sessions: Sessions, max_age_days: float) -> None:
        self._sessions = sessions
        self._max_age = timedelta(days=max_age_days)
        self._every_s = min(3600.0, self._max_age.total_seconds() / 10)
        self._last: float | None = None

    def run_if_due(self) -> list[str]:
        """The devices marked now (none when off or not due). Never raises."""
        if not self._max_age:
            return []
        if self._last is not None and time.monotonic() - self._last < self._every_s:
            return []
        self._last = time.monotonic()
        try:
            with self._sessions.begin() as s:
                marked = request_due_rotations(s, max_age=self._max_age, now=utcnow())
        except Exception:
            log.exception("could not mark credentials due for rotation")
            return []
        if marked:
            log.info("credentials of %d device(s) marked for rotation (past their maximum age)", len(marked))
        return marked


@dataclass(frozen=True)
class Accepted:
    device_id: str
    mqtt_username: str


def accept_request(session: Session, device_id: str, request: RotationRequest) -> Accepted:
    """Keep the new credentials of a verified request (``verify_rotation_request`` checked it
    is ``device_id``'s own) beside the current ones. Refused: no rotation asked, a replay (not
    newer than the last request accepted), a key this or another device uses."""
    get_device(session, device_id, active=True)
    # The row locked: two requests of one device at once are decided one after the other.
    device = session.scalars(select(Device).where(Device.id == device_id).with_for_update()).one()
    if device.rotation_requested is None:
        raise Conflict(f"no rotation of device {device_id}'s credentials was requested")
    if device.rotation_issued is not None and request.issued <= device.rotation_issued:
        raise Conflict("rotation request is not newer than one accepted before (a replay)")
    if request.public_key in (device.public_key, device.credentials_key):
        raise Conflict("rotation request reuses the key of the device's current credentials")
    key_taken = session.scalar(
        select(Device.id).where(
            (Device.public_key == request.public_key)
            | (Device.credentials_key == request.public_key)
            | (Device.next_public_key == request.public_key)
            | (Device.token_hash == request.token_sha256)
            | (Device.next_token_hash == request.token_sha256),
            Device.id != device_id,
        )
    )
    if key_taken is not None:
        raise Conflict("rotation request's key is another device's")
    device.rotation_issued = request.issued
    device.next_public_key = request.public_key
    device.next_token_hash = request.token_sha256
    device.next_mqtt_password_hash = request.mqtt_password_hash
    device.next_rabbitmq_password_hash = request.rabbitmq_password_hash
    return Accepted(device_id, broker_username(device_id, device.credentials_generation + 1))


def record_refusal(session: Session, device_id: str | None, why: str) -> None:
    """The ``device.rotation-refused`` event (in its own transaction: the refusal rolled back)."""
    record_event(session, ROTATION_REFUSED, f"rotation refused: {why}", device_id=device_id)


def confirm_rotation(session: Session, next_token_hash: str, *, now: datetime) -> str:
    """The device presenting its new token switched to it: the new credentials replace the
    old ones. Returns the device id; :class:`Unauthorized` for a token that is no device's
    new one (an answer lost and asked again with the new token is found by
    ``token_hash`` and answered by the caller)."""
    device = session.scalar(
        select(Device)
        .where(Device.next_token_hash == next_token_hash, Device.revoked.is_(False))
        .with_for_update()
    )
    if device is None:
        raise Unauthorized("device token is not the new token of a rotation in flight")
    assert device.next_mqtt_password_hash is not None
    device.token_hash = next_token_hash
    device.mqtt_password_hash = device.next_mqtt_password_hash
    device.rabbitmq_password_hash = device.next_rabbitmq_password_hash
    device.credentials_key = device.next_public_key
    device.credentials_generation += 1
    device.credentials_rotated_at = now
    clear_rotation(device)
    user = broker_username(device.id, device.credentials_generation)
    record_event(session, ROTATED, f"device {device.id}: credentials rotated (broker user {user})",
                 device_id=device.id)  # fmt: skip
    return device.id
