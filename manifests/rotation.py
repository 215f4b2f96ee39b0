"""Credential rotation: the signing request a device sends for its new credentials.

When the admin asks (``edgepack device rotate ID``) the hub marks the device's credentials
for rotation and says so in the answer to the device's next desired-state request
(:data:`ROTATE_HEADER`). The device makes a NEW Ed25519 key, derives its new HTTP token and
broker password from it (as a joining device does, :func:`manifests.join.derive_secrets`) and
sends a :class:`RotationRequest` signed by the new key (proof of possession), over a request
authenticated with its CURRENT token. Only verifiers travel; the key and secrets stay on the
device. The hub adds the new credentials beside the old ones (both work), the device writes
them, switches its broker session to them and confirms with the new token; only then does
the hub retire the old ones.

A device's broker user changes with each rotation (:func:`broker_username`): a broker keeps
one password per user, so the old and the new password can both work only as two users.

Pure: keys, bytes and the time go in, requests and verdicts come out.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manifests.desired import DEVICE_ID_PATTERN
from manifests.device import DeviceCredentials
from manifests.errors import TrustError
from manifests.join import DeviceSecrets, KeyRequest, make_key_request, verify_key_request

ROTATION_SCHEMA = "edgepack.rotation-request/v1"
#: Header of the hub's answer to ``GET /api/v1/device/desired`` while the device's
#: credentials are marked for rotation (its value is when the admin asked).
ROTATE_HEADER = "X-Edgepack-Rotate-Credentials"
REQUEST_PATH = "/api/v1/device/credentials"
CONFIRM_PATH = "/api/v1/device/credentials/confirm"
#: Where the agent keeps rotated credentials, in its state folder: the configured credentials
#: file may be read-only to it (``/etc/edgepack/device.json`` under a hardened unit).
ROTATED_FILE = "rotated-credentials.json"
#: A rotation request is a few hundred bytes; anything much larger is not one.
MAX_ROTATION_REQUEST_BYTES = 8 * 1024
#: Separates a device id from its credentials' generation in its broker user name. Not a
#: character of a device id, so ``edge-1~r2`` is never another device's name.
USERNAME_SEPARATOR = "~r"


def broker_username(device_id: str, generation: int) -> str:
    """The broker user of ``device_id``'s credentials of ``generation`` (0: as enrolled)."""
    return device_id if generation == 0 else f"{device_id}{USERNAME_SEPARATOR}{generation}"


class RotationRequest(KeyRequest):
    """What a device asks the hub to add as its new credentials (``public_key``: the NEW key)."""

    schema_: Literal["edgepack.rotation-request/v1"] = Field(
        default="edgepack.rotation-request/v1", alias="schema"
    )


class RotationAnswer(BaseModel):
    """The hub's answer: the broker user of the new credentials (the rest the device has)."""

    model_config = ConfigDict(extra="ignore")  # a newer hub may say more

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    mqtt_username: str = Field(min_length=1, max_length=128)


def make_rotation_request(
    new_key: Ed25519PrivateKey, *, device_id: str, hub_keyid: str, nonce: str, now: datetime
) -> bytes:
    """The signed request's bytes for ``new_key`` (``nonce``: 16 random bytes, hex)."""
    return make_key_request(
        RotationRequest, new_key, device_id=device_id, hub_keyid=hub_keyid, nonce=nonce, now=now
    )


def verify_rotation_request(
    data: bytes, *, device_id: str, hub_keyid: str, now: datetime, max_age_s: float
) -> RotationRequest:
    """The request in ``data`` if ``device_id`` (the device whose token came with it) may
    act on it at this hub: the checks of :func:`manifests.join.verify_key_request`, then that
    it names that same device; :class:`TrustError` naming the first that failed otherwise."""
    request = verify_key_request(
        data, RotationRequest, what="rotation request", max_bytes=MAX_ROTATION_REQUEST_BYTES,
        hub_keyid=hub_keyid, now=now, max_age_s=max_age_s,
    )  # fmt: skip
    if request.device_id != device_id:
        raise TrustError(
            f"rotation request names device {request.device_id!r} but came with the token of "
            f"{device_id!r}: a device rotates only its own credentials"
        )
    return request


def rotated_credentials(
    current: DeviceCredentials, secrets: DeviceSecrets, answer: RotationAnswer
) -> DeviceCredentials:
    """The device's credentials document with the new secrets and broker user in place."""
    if answer.device_id != current.device_id:
        raise TrustError(f"the hub answered for device {answer.device_id!r}, not {current.device_id!r}")
    mqtt = current.mqtt.model_copy(
        update={"username": answer.mqtt_username, "password": secrets.mqtt_password}
    )
    return current.model_copy(update={"token": secrets.token, "mqtt": mqtt})


class RotatedFile(BaseModel):
    """``<state_dir>/rotated-credentials.json``: the credentials a rotation gave, and which
    configured credentials file (its bytes' sha256) they replace."""

    model_config = ConfigDict(extra="forbid")

    replaces: str = Field(pattern=r"^[0-9a-f]{64}$")
    credentials: DeviceCredentials


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rotated_file_bytes(configured: bytes, credentials: DeviceCredentials) -> bytes:
    """The rotated-credentials file for ``credentials`` replacing the configured file ``configured``."""
    document = RotatedFile(replaces=file_digest(configured), credentials=credentials)
    return document.model_dump_json(indent=2, by_alias=True, exclude_none=True).encode()


def effective_credentials(
    configured: DeviceCredentials, configured_bytes: bytes, rotated: bytes | None
) -> DeviceCredentials:
    """The credentials the agent uses: the rotated ones when they replace the configured file
    as it is now (same bytes, same device); otherwise the configured ones, e.g. after the
    operator enrolled the device again and put a new file in place (the rotated ones are stale).
    An unreadable rotated file is ignored the same way: the configured one is the fallback."""
    if rotated is None:
        return configured
    try:
        document = RotatedFile.model_validate_json(rotated)
    except ValidationError:
        return configured
    stale = document.replaces != file_digest(configured_bytes)
    if stale or document.credentials.device_id != configured.device_id:
        return configured
    return document.credentials
