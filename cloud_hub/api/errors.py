"""The one place where errors become HTTP responses: ``{"error": {"type", "message"}}``."""

from __future__ import annotations

import errno
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from cloud_hub.errors import Conflict, Forbidden, GatewayTimeout, NotFound, TooLarge, Unauthorized
from manifests.errors import ConfigError, EdgepackError, FetchError, TrustError

log = logging.getLogger(__name__)

STATUS: list[tuple[type[EdgepackError], int]] = [
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (Unauthorized, 401),
    (Forbidden, 403),
    (TrustError, 422),
    (ConfigError, 400),
    (GatewayTimeout, 504),
    (FetchError, 502),
]


def error_body(kind: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": kind, "message": message}}


def status_for(exc: EdgepackError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def install_error_handlers(app: FastAPI) -> None:
    async def on_edgepack(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EdgepackError)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse(
            error_body(type(exc).__name__, str(exc)), status_code=status_for(exc), headers=headers
        )

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(
            error_body("ValidationError", f"{loc or 'request'}: {first.get('msg')}"),
            status_code=422,
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Still a JSON error body (clients parse one), never the exception text: it may name
        # paths or values a client should not see. The traceback goes to the hub's log.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return JSONResponse(
                error_body("InsufficientStorage", "the hub's disk is full; free space and try again"),
                status_code=507,
            )
        return JSONResponse(
            error_body("InternalError", "the hub failed to handle this request; see its log"), status_code=500
        )

    app.add_exception_handler(EdgepackError, on_edgepack)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(RequestValidationError, on_validation)
