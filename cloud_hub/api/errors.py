"""The one place where errors become HTTP responses: ``{"error": {"type", "message"}}``.

Every answer that is not a success has that shape: edgepack's own errors (by class), request
validation, FastAPI's and Starlette's ``HTTPException`` (unknown route, wrong method, a body
over the parsed-body cap) and anything unexpected (500, without internals). ``type`` is a
stable name clients act on — the CLI maps it to its exit codes (``packager.hubclient``)
instead of guessing from the status code.
"""

from __future__ import annotations

import errno
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cloud_hub.errors import (
    Conflict,
    DeviceOffline,
    Forbidden,
    GatewayTimeout,
    InvalidBatch,
    NotFound,
    Throttled,
    TooLarge,
    Unauthorized,
)
from manifests.errors import ConfigError, EdgepackError, FetchError, TrustError

log = logging.getLogger(__name__)

STATUS: list[tuple[type[EdgepackError], int]] = [
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (Unauthorized, 401),
    (Forbidden, 403),
    (Throttled, 429),
    (TrustError, 422),
    (InvalidBatch, 422),
    (ConfigError, 400),
    (GatewayTimeout, 504),
    (DeviceOffline, 503),
    (FetchError, 502),
]

#: ``type`` of an HTTPException by status: the edgepack leaf where one means the same thing.
HTTP_TYPES: dict[int, str] = {
    400: "ConfigError",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "TooLarge",
    422: "ValidationError",
    503: "Busy",
}

#: The ``type`` of a failure the hub did not expect (a bug, or a broken database).
INTERNAL = "InternalError"


def error_body(kind: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": kind, "message": message}}


def status_for(exc: EdgepackError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def type_for(exc: EdgepackError) -> str:
    """The ``type`` clients see: the nearest class of the error tree that has a status."""
    for cls, _status in STATUS:
        if isinstance(exc, cls):
            return cls.__name__
    return type(exc).__name__


def error_response(exc: EdgepackError) -> JSONResponse:
    """The answer to an error of the tree: for the exception handler, and for the routes that
    answer before FastAPI (cloud_hub.api.downloads)."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
    if isinstance(exc, Throttled) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(error_body(type_for(exc), str(exc)), status_code=status_for(exc), headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_edgepack(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EdgepackError)
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(
            error_body("ValidationError", f"{loc or 'request'}: {first.get('msg')}"),
            status_code=422,
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = HTTP_TYPES.get(exc.status_code, "FetchError" if exc.status_code >= 500 else "ConfigError")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such route: {request.method} {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs for the API"
        return JSONResponse(error_body(kind, message), status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Still a JSON error body (clients parse one), never the exception text: it may name
        # paths or values a client should not see. The traceback goes to the hub's log.
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return JSONResponse(
                error_body("InsufficientStorage", "the hub's disk is full; free space and try again"),
                status_code=507,
            )
        message = "the hub failed unexpectedly; the details are in its log"
        return JSONResponse(error_body(INTERNAL, message), status_code=500)

    app.add_exception_handler(EdgepackError, on_edgepack)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
