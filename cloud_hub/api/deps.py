"""Request dependencies: the parts of the hub a route needs, and the admin check.

The app holds the :class:`~cloud_hub.wiring.HubProcess` its lifespan wired; a route asks for
the part it uses (``Core`` for the database, blobs, keys and settings, ``Fleet`` to change what
devices run), never for the whole process.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from cloud_hub.api.csrf import check_dashboard_write
from cloud_hub.api.sessions import session_valid
from cloud_hub.core import HubCore
from cloud_hub.errors import Unauthorized
from cloud_hub.fleet.changes import FleetChanges
from cloud_hub.mqtt.link import MqttLink
from cloud_hub.wiring import HubProcess

ADMIN_COOKIE = "edgepack_admin"

# The part getters are ``async``: they only read app state, and FastAPI runs a plain ``def``
# dependency on a worker thread, a hop per dependency per request.


def _hub(request: Request) -> HubProcess:
    hub: HubProcess = request.app.state.hub
    return hub


async def get_hub(request: Request) -> HubProcess:
    return _hub(request)


async def get_core(request: Request) -> HubCore:
    return _hub(request).core


async def get_fleet(request: Request) -> FleetChanges:
    return _hub(request).fleet


async def get_link(request: Request) -> MqttLink | None:
    return _hub(request).link


Hub = Annotated[HubProcess, Depends(get_hub)]
Core = Annotated[HubCore, Depends(get_core)]
Fleet = Annotated[FleetChanges, Depends(get_fleet)]
Link = Annotated[MqttLink | None, Depends(get_link)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return None


def require_admin(request: Request, core: Core) -> None:
    """The admin token as a Bearer header (CLI), or the dashboard's session cookie; with the
    cookie, a request that changes something must also prove it came from the dashboard
    (:mod:`cloud_hub.api.csrf`)."""
    token = bearer_token(request)
    if token is not None:
        if not secrets.compare_digest(token.encode(), core.admin_token.encode()):
            raise Unauthorized("admin token is not valid")
        return
    session_id = request.cookies.get(ADMIN_COOKIE)
    if session_id is None:
        raise Unauthorized("admin token required: send 'Authorization: Bearer <token>'")
    with core.sessions.begin() as s:
        if not session_valid(s, session_id):
            raise Unauthorized("the dashboard session has ended; sign in again")
    check_dashboard_write(request, core.settings, session_id)


Admin = Depends(require_admin)
