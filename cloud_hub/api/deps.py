"""Request dependencies: the hub context and the admin check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from cloud_hub.api.sessions import session_valid
from cloud_hub.context import HubContext
from cloud_hub.errors import Unauthorized

ADMIN_COOKIE = "edgepack_admin"


def get_ctx(request: Request) -> HubContext:
    ctx: HubContext = request.app.state.ctx
    return ctx


Ctx = Annotated[HubContext, Depends(get_ctx)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return None


def require_admin(request: Request, ctx: Ctx) -> None:
    """The admin token as a Bearer header (CLI), or the dashboard's session cookie."""
    token = bearer_token(request)
    if token is not None:
        if not secrets.compare_digest(token.encode(), ctx.admin_token.encode()):
            raise Unauthorized("admin token is not valid")
        return
    session_id = request.cookies.get(ADMIN_COOKIE)
    if session_id is None:
        raise Unauthorized("admin token required: send 'Authorization: Bearer <token>'")
    with ctx.sessions.begin() as s:
        if not session_valid(s, session_id):
            raise Unauthorized("the dashboard session has ended; sign in again")


Admin = Depends(require_admin)
