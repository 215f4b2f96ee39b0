"""The device side of the HTTP API, authenticated by a device's own token.

A device may read its current signed desired state (the same bytes as the retained MQTT
message) and the manifests and blobs that state names — nothing else. Everything is read from
the database per request, so any hub replica answers the same.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.api.deps import Core, Fleet, bearer_token
from cloud_hub.api.registry import blob_response
from cloud_hub.errors import Forbidden, NotFound, Unauthorized
from cloud_hub.fleet.devices import token_hash
from cloud_hub.fleet.tables import Device, DeviceDesired
from cloud_hub.registry.tables import Module, ModuleFile
from cloud_hub.store.blobs import check_digest

router = APIRouter(prefix="/api/v1/device", tags=["device"])


def _token_of(request: Request) -> str:
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("device token required: send 'Authorization: Bearer <device token>'")
    return token


_INVALID = "device token is not valid (unknown or revoked device)"


def require_device(request: Request, core: Core) -> str:
    """The id of the device whose token came with the request."""
    token = _token_of(request)
    with core.sessions.begin() as s:
        device_id = s.scalar(
            select(Device.id).where(Device.token_hash == token_hash(token), Device.revoked.is_(False))
        )
    if device_id is None:
        raise Unauthorized(_INVALID)
    return device_id


def _device_and_named(session: Session, request: Request) -> tuple[str, list[str]]:
    """The device whose token came with the request, and the manifest digests its current
    desired state names: one query, in the route's own session (the downloads of a fleet-wide
    rollout are most of the hub's requests, and each extra session or thread hop showed)."""
    token = _token_of(request)
    row = session.execute(
        select(Device.id, DeviceDesired.payload)
        .outerjoin(DeviceDesired, DeviceDesired.device_id == Device.id)
        .where(Device.token_hash == token_hash(token), Device.revoked.is_(False))
    ).first()
    if row is None:
        raise Unauthorized(_INVALID)
    device_id, payload = row
    if payload is None:
        raise NotFound(f"device {device_id!r} has no desired state yet")
    # The hub wrote and signed these bytes itself: a plain JSON parse, no validation.
    return device_id, [m["manifest_digest"] for m in json.loads(payload)["signed"]["modules"]]


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


@router.get("/manifests/{digest}", summary="A module manifest named by this device's desired state")
def get_manifest(core: Core, digest: str, request: Request) -> Response:
    with core.sessions.begin() as s:
        device_id, named = _device_and_named(s, request)
        check_digest(digest)
        if digest not in named:
            raise Forbidden(f"manifest {digest} is not named by device {device_id!r}'s desired state")
        manifest = s.scalar(select(Module.manifest).where(Module.manifest_digest == digest))
    if manifest is None:
        raise NotFound(f"no module with manifest digest {digest} is in the registry")
    return Response(content=manifest, media_type="application/json")


@router.get("/blobs/{digest}", summary="A blob of a module this device's desired state names")
def get_blob(core: Core, digest: str, request: Request) -> Response:
    with core.sessions.begin() as s:
        device_id, named = _device_and_named(s, request)
        check_digest(digest)
        part_of = (
            select(ModuleFile.id)
            .join(Module, Module.id == ModuleFile.module_id)
            .where(Module.manifest_digest.in_(named), ModuleFile.digest == digest)
            .limit(1)
        )
        allowed = bool(named) and s.scalar(part_of) is not None
    if not allowed:
        raise Forbidden(f"blob {digest} is not part of a module in device {device_id!r}'s desired state")
    return blob_response(core, digest, request.headers.get("range"), "application/octet-stream")
