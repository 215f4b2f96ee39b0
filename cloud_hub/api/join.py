"""Routes of zero-touch enrolment: provisioning tokens (admin) and joins (a provisioning token).

``POST /api/v1/join`` takes the device's signed join request as the body and its provisioning
token as ``Authorization: Bearer ep_join_…``. Checks that need no database (size, signature,
this hub, freshness) run first; the rest (token, id, key) in the batch that enrols it
(:mod:`cloud_hub.fleet.joins`). Every refusal is one error and one ``device.join-refused``
event; a refused join leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.api.deps import Admin, Core, Fleet, Hub, bearer_token
from cloud_hub.core import HubCore
from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict, Unauthorized
from cloud_hub.fleet.provisioning import (
    MAX_TOKEN_LIFETIME_S,
    MAX_TOKEN_USES,
    Join,
    Joined,
    Pending,
    approve_join,
    create_token,
    list_pending,
    list_tokens,
    record_refusal,
    reject_join,
    revoke_token,
)
from cloud_hub.fleet.tables import ProvisioningToken
from cloud_hub.login_throttle import client_key
from cloud_hub.tls.material import ca_pem
from manifests.errors import ConfigError, TrustError
from manifests.join import PROVISIONING_TOKEN_PREFIX, JoinAnswer, JoinRequest, verify_join_request
from manifests.signing import TrustedKey, raw_public_bytes

router = APIRouter(tags=["enrolment"])
admin = APIRouter(prefix="/api/v1/provisioning-tokens", dependencies=[Admin], tags=["enrolment"])

_TOKEN_SHAPE = re.compile(re.escape(PROVISIONING_TOKEN_PREFIX) + r"[A-Za-z0-9_-]{43}")


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: dict[str, str] = Field(default_factory=dict, description="given to each device; '{id}' is its id")
    uses: int = Field(ge=1, le=MAX_TOKEN_USES, description="devices that may join with it")
    expires_in_s: int = Field(ge=60, le=MAX_TOKEN_LIFETIME_S)
    approval: bool = Field(default=False, description="joins wait for 'edgepack device approve'")


class PendingOut(BaseModel):
    device_id: str
    token_id: str
    rejected: bool
    asked_at: datetime


class TokenOut(BaseModel):
    id: str
    tags: dict[str, str]
    uses: int
    used: int
    expires: datetime
    revoked: bool
    approval: bool
    created_at: datetime


class TokenCreated(TokenOut):
    token: str = Field(description="shown once; the hub keeps only its sha256")


def _token_out(row: ProvisioningToken) -> TokenOut:
    return TokenOut(
        id=row.id, tags=dict(row.tags or {}), uses=row.max_uses, used=row.used, expires=row.expires,
        revoked=row.revoked, approval=row.approval, created_at=row.created_at,
    )  # fmt: skip


@admin.post("", status_code=201, response_model=TokenCreated)
def make_token(core: Core, body: TokenCreate) -> TokenCreated:
    with core.sessions.begin() as s:
        new = create_token(
            s, tags=body.tags, max_uses=body.uses, lifetime_s=body.expires_in_s, now=utcnow(),
            approval=body.approval,
        )  # fmt: skip
        out = _token_out(new.row)
    return TokenCreated(**out.model_dump(), token=new.token)


@admin.get("")
def show_tokens(core: Core) -> dict[str, list[TokenOut]]:
    with core.sessions.begin() as s:
        return {"tokens": [_token_out(r) for r in list_tokens(s)]}


@admin.post("/{token_id}/revoke", response_model=TokenOut)
def revoke(core: Core, token_id: str) -> TokenOut:
    """No device joins with it from now on; devices that joined with it keep their credentials."""
    with core.sessions.begin() as s:
        return _token_out(revoke_token(s, token_id))


pending = APIRouter(prefix="/api/v1/joins/pending", dependencies=[Admin], tags=["enrolment"])


@pending.get("")
def show_pending(core: Core) -> dict[str, list[PendingOut]]:
    """Joins of approval tokens waiting for the admin (and those rejected)."""
    with core.sessions.begin() as s:
        rows = list_pending(s)
        return {"pending": [PendingOut(device_id=p.device_id, token_id=p.token_id, rejected=p.rejected,
                                       asked_at=p.created_at) for p in rows]}  # fmt: skip


@pending.post("/{device_id}/approve")
def approve(fleet: Fleet, device_id: str) -> dict[str, Any]:
    """Enrol the waiting device: its desired state and broker account are made now."""
    change = fleet.change_devices(lambda s: approve_join(s, device_id), lambda _joined: [device_id])
    return {"device_id": device_id, "tags": change.result.tags, "issued": dict(change.issued)}


@pending.post("/{device_id}/reject")
def reject(core: Core, device_id: str) -> dict[str, Any]:
    """Refuse the waiting join; the device hears it when it asks again."""
    with core.sessions.begin() as s:
        reject_join(s, device_id)
    return {"device_id": device_id, "rejected": True}


def _answer(core: HubCore, request: JoinRequest, joined: Joined, ca: str | None) -> JoinAnswer:
    settings = core.settings
    pub = core.hub_key.public_key()
    return JoinAnswer(
        device_id=request.device_id,
        hub_url=settings.base_url(),
        mqtt_host=settings.mqtt_public_host or settings.mqtt_host,
        mqtt_port=settings.mqtt_public_port or settings.mqtt_port,
        mqtt_username=request.device_id,
        topic_prefix=settings.topic_prefix,
        mqtt_tls=settings.mqtt_tls_ca is not None,
        ca_pem=ca,
        hub_key=TrustedKey(keyid=core.hub_key_id, public_key=raw_public_bytes(pub).hex(), name="hub"),
        publishers=core.trust,
        tags=joined.tags,
        token_id=joined.token_id,
    )


@router.post(
    "/api/v1/join",
    status_code=201,
    response_model=JoinAnswer,
    responses={202: {"description": "waiting for the admin's approval; ask again later"}},
)
async def join(hub: Hub, request: Request) -> JoinAnswer | JSONResponse:
    """Enrol the device that signed the request body, with the provisioning token it sent."""
    joins = hub.joins
    assert joins is not None
    client = client_key(request.client.host if request.client else None)
    # The body is at most 16 KiB (body_limit); read it whole before any refusal, so the
    # connection is left clean for the device's next request.
    body = await request.body()
    joins.admit(client)
    token = bearer_token(request)

    core = hub.core
    try:
        if token is None or not _TOKEN_SHAPE.fullmatch(token):
            raise Unauthorized("provisioning token required: send 'Authorization: Bearer ep_join_…'")
        # On the event loop: a quarter of a millisecond, cheaper than a hop to a thread.
        verified = verify_join_request(
            body, hub_keyid=core.hub_key_id, now=utcnow(), max_age_s=core.settings.join_max_age_s
        )
    except (Unauthorized, TrustError) as exc:
        episode = joins.wrong(client)
        await run_in_threadpool(_record_refusal, core, str(exc), client if episode else None)
        raise
    # Waiting for the batch holds no thread of the server's pool.
    try:
        joined = await asyncio.wrap_future(joins.submit(Join(verified, token)))
    except (Unauthorized, Conflict, ConfigError):
        # Refused (the batch recorded why): no token of this hub, a replay, an id taken.
        # Counted per address like a wrong token: no client, holding a token or not, writes
        # refusal events or spends the shared bound at will. (403, a token spent, revoked or
        # expired, is not: a fleet behind one address would be blocked when its token runs out.)
        if joins.wrong(client):
            await run_in_threadpool(_record_throttled, core, client)
        raise
    joins.succeeded(client)
    if isinstance(joined, Pending):
        # Accepted, not enrolled: the device asks again (a newer request) until approved.
        body_out = {"pending": True, "device_id": joined.device_id, "token_id": joined.token_id}
        return JSONResponse(body_out, status_code=202)
    # The CA file is small and read from the page cache: no thread hop for it.
    return _answer(core, verified, joined, ca_pem(core.settings))


def _record_refusal(core: HubCore, why: str, throttled: str | None) -> None:
    with core.sessions.begin() as s:
        record_refusal(s, None, why)
    if throttled is not None:
        _record_throttled(core, throttled)


def _record_throttled(core: HubCore, client: str) -> None:
    # Once per episode, not per attempt: the event log is not the attacker's to fill.
    with core.sessions.begin() as s:
        record_refusal(s, None, f"joins from {client} throttled after repeated wrong joins")
