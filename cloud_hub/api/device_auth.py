"""The device side of the HTTP API, authenticated by a device's own token.

A device may read its current signed desired state (the same bytes as the retained MQTT
message) and the manifests and blobs that state names — nothing else. Everything is read from
the database per request, so any hub replica answers the same; the downloads of manifests and
blobs are answered before FastAPI, from grants each replica keeps for a bounded time
(:mod:`cloud_hub.api.downloads`, :mod:`cloud_hub.fleet.grants`), loaded by
:class:`DatabaseGrants` below.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.api.deps import Core, Fleet, bearer_token
from cloud_hub.db.base import Sessions
from cloud_hub.errors import NotFound, Unauthorized
from cloud_hub.fleet.devices import token_hash
from cloud_hub.fleet.tables import Device, DeviceDesired
from cloud_hub.registry.tables import Module, ModuleFile

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


class DatabaseGrants:
    """A :class:`cloud_hub.fleet.grants.GrantSource` in the hub's database (called off the
    event loop): who a token belongs to, what its desired state names, what a module holds."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    def grant(self, token_hash: str) -> tuple[str, frozenset[str] | None] | None:
        with self._sessions.begin() as s:
            row = s.execute(
                select(Device.id, DeviceDesired.payload)
                .outerjoin(DeviceDesired, DeviceDesired.device_id == Device.id)
                .where(Device.token_hash == token_hash, Device.revoked.is_(False))
            ).first()
        if row is None:
            return None
        device_id, payload = row
        if payload is None:
            return device_id, None
        # The hub wrote and signed these bytes itself: a plain JSON parse, no validation.
        return device_id, frozenset(m["manifest_digest"] for m in json.loads(payload)["signed"]["modules"])

    def module_blobs(self, manifests: Iterable[str]) -> dict[str, frozenset[str]]:
        wanted = list(manifests)
        found: dict[str, set[str]] = {m: set() for m in wanted}
        with self._sessions.begin() as s:
            rows = s.execute(
                select(Module.manifest_digest, ModuleFile.digest)
                .join(ModuleFile, ModuleFile.module_id == Module.id)
                .where(Module.manifest_digest.in_(wanted))
            )
            for manifest, blob in rows:
                found[manifest].add(blob)
        # A module with no files (or not in the registry) allows no blob: an empty set says so.
        return {m: frozenset(blobs) for m, blobs in found.items()}

    def manifest(self, digest: str) -> bytes | None:
        with self._sessions.begin() as s:
            return s.scalar(select(Module.manifest).where(Module.manifest_digest == digest))


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
