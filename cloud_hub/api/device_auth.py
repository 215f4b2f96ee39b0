"""The device side of the HTTP API, authenticated by a device's own token.

A device may read its current signed desired state (the same bytes as the retained MQTT
message) and the manifests and blobs that state names — nothing else. The desired state is
read from the database per request, so any hub replica answers the same; the downloads of manifests and
blobs are answered before FastAPI, from grants each replica keeps for a bounded time
(:mod:`cloud_hub.api.downloads`, :mod:`cloud_hub.fleet.grants`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.api.deps import Core, Fleet, Hub, bearer_token
from cloud_hub.core import HubCore
from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict, NotFound, TooLarge, Unauthorized
from cloud_hub.fleet.devices import token_hash, token_matches
from cloud_hub.fleet.rotation import accept_request, confirm_rotation, record_refusal
from cloud_hub.fleet.tables import Device, DeviceDesired
from manifests.bounds import escape_controls
from manifests.errors import TrustError
from manifests.rotation import (
    MAX_ROTATION_REQUEST_BYTES,
    ROTATE_HEADER,
    RotationAnswer,
    verify_rotation_request,
)

router = APIRouter(prefix="/api/v1/device", tags=["device"])


def _token_of(request: Request) -> str:
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("device token required: send 'Authorization: Bearer <device token>'")
    return token


INVALID_TOKEN = "device token is not valid (unknown or revoked device)"


def require_device(request: Request, core: Core) -> str:
    """The id of the device whose token came with the request."""
    token = _token_of(request)
    with core.sessions.begin() as s:
        device_id = s.scalar(select(Device.id).where(token_matches(token_hash(token))))
    if device_id is None:
        raise Unauthorized(INVALID_TOKEN)
    return device_id


DeviceId = Annotated[str, Depends(require_device)]


def _current_payload(session: Session, device_id: str) -> DeviceDesired:
    row = session.get(DeviceDesired, device_id)
    if row is None or row.payload is None:
        raise NotFound(f"device {device_id!r} has no desired state yet")
    return row


@router.get("/desired", summary="This device's current signed desired state")
def get_desired(core: Core, fleet: Fleet, device_id: DeviceId, request: Request) -> Response:
    """The signed envelope bytes; the generation is the ETag, so a polling agent that sends
    ``If-None-Match`` gets 304 until there is something new."""
    fleet.renew_if_expiring(device_id)
    with core.sessions.begin() as s:
        row = _current_payload(s, device_id)
        payload, generation = row.payload, row.generation
    assert payload is not None
    headers = {
        "ETag": f'"{generation}"',
        "X-Edgepack-Generation": str(generation),
        "Cache-Control": "no-cache",
    }
    with core.sessions.begin() as s:
        rotation = s.scalar(select(Device.rotation_requested).where(Device.id == device_id))
    if rotation is not None:
        # The device learns of a rotation in the answer it asks for anyway, 304 included.
        headers[ROTATE_HEADER] = rotation.isoformat()
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return Response(content=payload, media_type="application/json", headers=headers)


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes without holding more than that."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"rotation request is over {limit} bytes")
    return bytes(body)


def _refused(core: HubCore, device_id: str, why: str) -> None:
    with core.sessions.begin() as s:
        record_refusal(s, device_id, escape_controls(why))


@router.post(
    "/credentials", summary="Ask for new credentials (a rotation the admin requested)",
    response_model=RotationAnswer,
)  # fmt: skip
async def request_credentials(hub: Hub, request: Request) -> RotationAnswer:
    """The body is the device's signed :class:`~manifests.rotation.RotationRequest`, sent with
    its CURRENT token (not the new one of a rotation in flight). The new credentials work
    beside the old ones from the answer on, until the device confirms them."""
    core, fleet = hub.core, hub.fleet
    body = await _bounded_body(request, MAX_ROTATION_REQUEST_BYTES)
    token = _token_of(request)
    device_id = await run_in_threadpool(_current_token_device, core, token)
    try:
        verified = verify_rotation_request(
            body, device_id=device_id, hub_keyid=core.hub_key_id, now=utcnow(),
            max_age_s=core.settings.rotation_max_age_s,
        )  # fmt: skip
        accept = lambda s: accept_request(s, device_id, verified)  # noqa: E731
        accepted = await run_in_threadpool(fleet.change_accounts, accept)
    except (TrustError, Conflict) as exc:
        await run_in_threadpool(_refused, core, device_id, str(exc))
        raise
    return RotationAnswer(device_id=device_id, mqtt_username=accepted.mqtt_username)


def _current_token_device(core: HubCore, token: str) -> str:
    """The device whose current token this is (the new token of a rotation does not ask)."""
    with core.sessions.begin() as s:
        device_id = s.scalar(
            select(Device.id).where(Device.token_hash == token_hash(token), Device.revoked.is_(False))
        )
    if device_id is None:
        raise Unauthorized(INVALID_TOKEN)
    return device_id


@router.post("/credentials/confirm", summary="The device switched to its new credentials")
def confirm_credentials(core: Core, fleet: Fleet, request: Request) -> dict[str, str]:
    """Sent with the NEW token once the device uses it on the broker: the old credentials are
    retired now. Asked again after the answer was lost, it is answered the same."""
    hashed = token_hash(_token_of(request))
    with core.sessions.begin() as s:
        done = s.scalar(select(Device.id).where(Device.token_hash == hashed, Device.revoked.is_(False)))
    if done is not None:
        return {"device_id": done, "rotation": "confirmed"}
    device_id = fleet.change_accounts(lambda s: confirm_rotation(s, hashed, now=utcnow()))
    return {"device_id": device_id, "rotation": "confirmed"}
