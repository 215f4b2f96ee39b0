"""A cap on request bodies that are parsed whole (JSON, forms), enforced as the bytes arrive.

FastAPI reads and parses a route's JSON or form body *before* it runs the route's
dependencies, so without a cap anyone, with no token at all, could make the hub buffer and
parse a body of any size before it answers 401. The streamed uploads (blobs, module pushes)
check the admin token first and enforce ``max_upload_mb`` themselves, so they are exempt.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_hub.api.errors import error_body

#: Large enough for a model registration naming ~100k files; far below what hurts the hub.
MAX_PARSED_BODY = 16 << 20

#: (method, path prefix) of the routes that stream their body under their own limit.
STREAMED_UPLOADS = (("PUT", "/api/v1/blobs/"), ("POST", "/api/v1/modules"))


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


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyLimit:
    """ASGI middleware: refuse a body over ``max_bytes`` unless the route streams it."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_PARSED_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_streamed_upload(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            # Answer before reading anything; the server closes the connection afterwards.
            body = error_body("TooLarge", _message(self.max_bytes))
            await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)
