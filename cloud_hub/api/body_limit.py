"""What a request may make the hub hold, decided before its body is read.

FastAPI reads and parses a route's JSON or form body *before* it runs the route's
dependencies, so the admin check there comes too late: 24 clients with no token that each sent
15 MB of a 16 MB body made the hub grow by 360 MB. This middleware, in front of every route:

1. **Asks who it is, from the headers alone.** A request that carries a body must bring the
   admin token (``Authorization: Bearer``), a live dashboard session cookie or, under
   ``/api/v1/device/``, a device token; otherwise it is answered 401 and its connection closed
   before a byte of the body is read. Only the sign-in and sign-out forms take a body from
   anyone, at most :data:`MAX_PUBLIC_BODY` bytes (and a device's join request, which carries
   a provisioning token the join itself checks). The routes still check credentials as before
   (and more: which device, CSRF); this only decides whether a body is read at all.
2. **Caps each body that is parsed whole** (JSON, forms) at ``max_body_mb``: 413 from its
   Content-Length before reading, else as the bytes arrive. Streamed uploads (blobs, module
   pushes) are never held: uvicorn stops reading at 64 KiB until the route takes more, and the
   route enforces ``max_upload_mb`` as the bytes reach the disk.
3. **Bounds what all requests hold together**: the parsed bodies in memory at once are at most
   ``max_bodies_in_flight_mb``. A request whose Content-Length does not fit in what is left is
   answered 503 with ``Retry-After`` before reading; a chunked one takes its share as its
   chunks arrive.
"""

from __future__ import annotations

import secrets

import anyio.to_thread
from sqlalchemy import select
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_hub.api.deps import ADMIN_COOKIE, bearer_token
from cloud_hub.api.errors import error_body
from cloud_hub.api.sessions import session_valid
from cloud_hub.core import HubCore
from cloud_hub.fleet.devices import token_hash, token_matches
from cloud_hub.fleet.tables import Device
from cloud_hub.settings import HubSettings

MIB = 1 << 20

#: The sign-in form holds one token; nothing a browser sends there comes near this.
MAX_PUBLIC_BODY = 16 << 10

#: (method, path) of the routes that take a body from anyone (small: MAX_PUBLIC_BODY). A join
#: comes with a provisioning token, checked in its batch; the join rate bound comes first.
PUBLIC_BODIES = frozenset(
    {("POST", "/api/v1/dashboard/login"), ("POST", "/api/v1/dashboard/logout"), ("POST", "/api/v1/join")}
)

#: Where a device token, not the admin's, is what a body must come with.
DEVICE_PREFIX = "/api/v1/device/"

#: (method, path prefix) of the routes that stream their body under their own limit.
STREAMED_UPLOADS = (
    ("PUT", "/api/v1/blobs/"),
    ("POST", "/api/v1/modules"),
    # Collected data: at most manifests.data.MAX_BATCH_BYTES, spooled to a temp file.
    ("PUT", "/api/v1/device/data/"),
)

#: What a client refused for want of room is told to wait: parsed bodies come and go in
#: well under a second on a hub that is not under attack.
RETRY_AFTER_S = 2


def is_streamed_upload(method: str, path: str) -> bool:
    return any(
        method == m and (path == p or (p.endswith("/") and path.startswith(p)))
        for m, p in STREAMED_UPLOADS
    )


def _message(limit: int) -> str:
    return f"request body is larger than {limit} bytes; upload files with PUT /api/v1/blobs/<digest>"


class BodyTooLarge(HTTPException):
    # An HTTPException because FastAPI re-raises those from its body parsing (anything else
    # becomes a 400 "error parsing the body").
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=_message(limit))


_BUSY_MESSAGE = "the hub holds as many request bodies as it may; try again shortly"


class BodiesBusy(HTTPException):
    def __init__(self) -> None:
        headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
        super().__init__(status_code=503, detail=_BUSY_MESSAGE, headers=headers)


class BodyBudget:
    """The bytes of parsed bodies the requests of one hub process hold. Used from the event
    loop only (every ``receive`` runs there), so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return bytes(value)
    return None


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length != b"0")


def _declared_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _refusal(core: HubCore, request: Request) -> str | None:
    """Why the request's headers do not carry credentials that are valid now, or None when
    they do; the same words as the routes' own checks (may query the database for a session
    cookie or a device token)."""
    token = bearer_token(request)
    if request.url.path.startswith(DEVICE_PREFIX):
        if token is None:
            return "device token required: send 'Authorization: Bearer <device token>'"
        with core.sessions.begin() as s:
            found = s.scalar(
                select(Device.id).where(token_matches(token_hash(token)))
            )
        return None if found is not None else "device token is not valid (unknown or revoked device)"
    if token is not None:
        return _admin_refusal(core, token)
    session_id = request.cookies.get(ADMIN_COOKIE)
    if session_id is None:
        return "admin token required: send 'Authorization: Bearer <token>'"
    with core.sessions.begin() as s:
        return None if session_valid(s, session_id) else "the dashboard session has ended; sign in again"


def _admin_refusal(core: HubCore, token: str) -> str | None:
    if secrets.compare_digest(token.encode(), core.admin_token.encode()):
        return None
    return "admin token is not valid"


async def _why_not_read(scope: Scope) -> str | None:
    """None when the request may send its body, else why not."""
    core: HubCore = scope["app"].state.hub.core
    request = Request(scope)
    token = bearer_token(request)
    if token is not None and not request.url.path.startswith(DEVICE_PREFIX):
        # The admin token is compared in memory: no thread hop for the CLI's uploads.
        return _admin_refusal(core, token)
    return await anyio.to_thread.run_sync(_refusal, core, request)


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, kind: str, message: str,
                  headers: dict[str, str] | None = None) -> None:
    """Answer without reading the body; ``Connection: close`` makes uvicorn close the socket
    after the answer, so the unread body is dropped by the kernel, never read."""
    response = JSONResponse(
        error_body(kind, message), status_code=status, headers={**(headers or {}), "Connection": "close"}
    )
    await response(scope, receive, send)


class BodyLimit:
    """ASGI middleware: credentials before a body is read, and the bounds on parsed bodies."""

    def __init__(self, app: ASGIApp, settings: HubSettings) -> None:
        self.app = app
        self.max_bytes = settings.max_body_mb * MIB
        self.budget = BodyBudget(settings.max_bodies_in_flight_mb * MIB)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        public = (method, path) in PUBLIC_BODIES
        refusal = None if public else await _why_not_read(scope)
        if refusal is not None:
            headers = {"WWW-Authenticate": "Bearer"}
            await _answer(scope, receive, send, 401, "Unauthorized", refusal, headers)
            return
        if is_streamed_upload(method, path):
            await self.app(scope, receive, send)
            return
        limit = MAX_PUBLIC_BODY if public else self.max_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _answer(scope, receive, send, 413, "TooLarge", _message(limit))
            return
        held = declared or 0
        if not self.budget.take(held):
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            await _answer(scope, receive, send, 503, "Busy", _BUSY_MESSAGE, headers)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received, held
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                if received > held:  # a chunked body takes its share as it comes
                    if not self.budget.take(received - held):
                        raise BodiesBusy()
                    held = received
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            self.budget.give(held)
