"""Collected production data over HTTP: devices upload batches, the admin lists and downloads
them (docs/data-collection.md; the contract is :mod:`manifests.data`).

``PUT /api/v1/device/data/{digest}`` decides everything it can from the request's head before
it reads a byte of the body: the device's token, the batch's key, the headers, the service
(one the device runs or ran), the size, the device's budget. A refusal then is answered at once
with ``Connection: close``, so the body is dropped by the kernel, never read. A batch that
passes is read (at most ``MAX_BATCH_BYTES``) into an unnamed temp file, then checked and stored.
"""

from __future__ import annotations

import functools
import math
import re
from datetime import datetime
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from cloud_hub.api.deps import Admin, bearer_token
from cloud_hub.api.errors import error_body, status_for, type_for
from cloud_hub.data import batches
from cloud_hub.data.intake import CollectedData
from cloud_hub.errors import Throttled, TooLarge, Unauthorized
from cloud_hub.store.blobs import check_digest
from cloud_hub.store.streaming import AsyncBodyReader
from manifests.data import (
    CONTENT_TYPE,
    DESIGNATION_PATTERN,
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    MODEL_NAME_PATTERN,
    RECORDS_HEADER,
    UPLOAD_PATH,
    BatchKey,
)
from manifests.desired import DEVICE_ID_PATTERN
from manifests.errors import ConfigError, EdgepackError
from manifests.module import NAME_PATTERN

device_router = APIRouter(prefix=UPLOAD_PATH, tags=["data"])
admin_router = APIRouter(prefix="/api/v1/services", tags=["data"], dependencies=[Admin])

#: A listing's page at most (the CLI pages through all of them).
MAX_PAGE = 1000


async def get_data(request: Request) -> CollectedData:
    data: CollectedData | None = request.app.state.hub.data
    assert data is not None, "the hub was wired without collected data"
    return data


Data = Annotated[CollectedData, Depends(get_data)]


def _refusal(exc: EdgepackError) -> JSONResponse:
    """The error answer, and the connection closed: the body was not read and never will be."""
    headers = {"Connection": "close"}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, Throttled) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(error_body(type_for(exc), str(exc)), status_code=status_for(exc), headers=headers)


def _key(request: Request) -> BatchKey:
    query = request.query_params
    fields = ("service", "model", "model_version", "designation", "day")
    unknown = sorted(set(query) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown query parameter {unknown[0][:50]!r}; the batch key is {', '.join(fields)}"
        )
    try:
        return BatchKey.model_validate({f: query.get(f) for f in fields})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "query"
        raise ConfigError(f"batch key {where}: {first.get('msg', 'invalid')}") from None


def _declared(request: Request) -> tuple[int, int]:
    """(records, bytes) the head declares; every header the contract asks for, checked."""
    headers = request.headers
    if headers.get("content-encoding", "").strip().lower() != "gzip":
        raise ConfigError("send the batch gzip-compressed with 'Content-Encoding: gzip'")
    if headers.get("content-type", "").split(";")[0].strip().lower() != CONTENT_TYPE:
        raise ConfigError(f"send the batch as 'Content-Type: {CONTENT_TYPE}'")
    records = headers.get(RECORDS_HEADER, "")
    # isascii() too: isdigit() takes '²' and other digits int() refuses (a 500, not a 400).
    if not (records.isascii() and records.isdigit()) or not 1 <= int(records) <= MAX_BATCH_RECORDS:
        raise ConfigError(f"{RECORDS_HEADER} must be the number of records, 1 to {MAX_BATCH_RECORDS}")
    length = headers.get("content-length", "")
    if not length.isdigit():
        raise ConfigError("send the batch with a Content-Length (not chunked)")
    if int(length) > MAX_BATCH_BYTES:
        raise TooLarge(f"a batch is at most {MAX_BATCH_BYTES} bytes compressed; this one declares {length}")
    return int(records), int(length)


@device_router.put(
    "/{digest}",
    status_code=201,
    summary="Upload a batch of collected data (gzip JSON lines); idempotent by digest",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def put_batch(digest: str, request: Request, data: Data) -> Response:
    try:
        check_digest(digest)
        token = bearer_token(request)
        if token is None:
            raise Unauthorized("device token required: send 'Authorization: Bearer <device token>'")
        key = _key(request)
        records, length = _declared(request)
        admitted = await run_in_threadpool(data.admit, token, key, digest)
        data.charge(admitted.device_id, length)
    except EdgepackError as exc:
        return _refusal(exc)
    raw = AsyncBodyReader(request.stream(), limit=MAX_BATCH_BYTES)
    if admitted.stored is not None:
        await raw.drain()
        return JSONResponse(admitted.stored.model_dump(mode="json"), status_code=200)
    try:
        # From the unbuffered reader: a piece of the body at a time (a buffered one held 2 MiB
        # per upload while it was spooled).
        spool, size = await run_in_threadpool(data.spool, raw, digest)
    except EdgepackError:
        await raw.drain()
        raise
    # The body is on disk now; checking it takes memory, so only a few are checked at once.
    with spool:
        check = functools.partial(
            data.receive, spool, size, device_id=admitted.device_id, key=key, digest=digest, declared=records
        )
        batch, new = await anyio.to_thread.run_sync(check, limiter=data.limiter)
    return JSONResponse(batch.model_dump(mode="json"), status_code=201 if new else 200)


@admin_router.get("/{service}/data", summary="A service's batches of collected data, paged")
def list_batches(
    service: str,
    data: Data,
    since: datetime | None = None,
    until: datetime | None = None,
    designation: Annotated[str | None, Query(pattern=DESIGNATION_PATTERN)] = None,
    model: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN)] = None,
    device: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[int, Query(ge=0, le=(1 << 62))] = 0,
) -> dict[str, Any]:
    """``batches`` oldest first; ``next`` is the ``after`` of the next page (null: no more);
    ``devices``: per device of this page, the newest telemetry's spool figures for the service."""
    _check_service(service)
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.utcoffset() is None:
            raise ConfigError(f"{name}: give a time with its zone (…Z or +00:00)")
    where = batches.BatchFilter(since=since, until=until, designation=designation, model=model, device=device)
    with data.sessions.begin() as s:
        rows = batches.page(s, service, where, after=after, limit=limit)
        figures = batches.spool_figures(s, service, sorted({r.device_id for r in rows}))
        listed = [batches.stored(r).model_dump(mode="json") for r in rows]
    return {
        "batches": listed,
        "next": str(rows[-1].id) if len(rows) == limit else None,
        "devices": figures,
    }


@admin_router.get(
    "/{service}/data/{digest}",
    summary="One batch as stored: gzip-compressed JSON lines",
    response_class=StreamingResponse,
)
def get_batch(
    service: str,
    digest: str,
    data: Data,
    device: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
) -> Response:
    _check_service(service)
    check_digest(digest)
    batch = data.find(service, digest, device)
    headers = {
        "Content-Length": str(batch.bytes),
        "ETag": f'"{batch.digest}"',
        RECORDS_HEADER: str(batch.records),
        "X-Edgepack-Device": batch.device_id,
    }
    return StreamingResponse(data.chunks(batch), media_type="application/gzip", headers=headers)


@admin_router.delete("/{service}/data", summary="Delete a service's collected data")
def delete_batches(
    service: str,
    data: Data,
    device: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    """Every batch of the service (of one ``device``, received before ``until``, when given),
    its row and its bytes: ``{"deleted": N}``. The service itself need not exist any more."""
    _check_service(service)
    if until is not None and until.utcoffset() is None:
        raise ConfigError("until: give a time with its zone (…Z or +00:00)")
    return {"deleted": data.delete(service, device=device, until=until)}


def _check_service(service: str) -> None:
    if not re.fullmatch(NAME_PATTERN, service):
        raise ConfigError(f"{service[:100]!r} is not a service name")
