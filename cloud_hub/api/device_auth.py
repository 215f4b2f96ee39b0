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
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.api.deps import Core, Fleet, bearer_token
from cloud_hub.errors import NotFound, Unauthorized
from cloud_hub.fleet.devices import token_hash
from cloud_hub.fleet.tables import Device, DeviceDesired

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
        device_id = s.scalar(
            select(Device.id).where(Device.token_hash == token_hash(token), Device.revoked.is_(False))
        )
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
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return Response(content=payload, media_type="application/json", headers=headers)
