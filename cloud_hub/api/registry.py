"""Routes: the model and module registry and the blobs behind them (admin token required).

Uploads are streamed: the body goes chunk by chunk into the blob store (or through the bundle
verifier into a staging area) in a worker thread, never whole into memory.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import IO, Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from cloud_hub.api.deps import Admin, Core, Fleet
from cloud_hub.core import HubCore
from cloud_hub.errors import NotFound
from cloud_hub.events import record_event
from cloud_hub.fleet.changes import Outcome
from cloud_hub.registry import blob_refs, owners
from cloud_hub.registry import models as model_registry
from cloud_hub.registry import modules as module_registry
from cloud_hub.registry.blob_refs import lock_registry
from cloud_hub.registry.tables import ModelVersion, Module
from cloud_hub.registry.tags import parse_filters
from cloud_hub.store.blobs import CHUNK, check_digest, holds_intact
from cloud_hub.store.streaming import MIB, body_file, check_declared_length
from manifests.bounds import MAX_TAGS, Count, TagKey, TagMap, Text
from manifests.bundle import BundleLimits
from manifests.errors import ConfigError, EdgepackError, TrustError
from manifests.signing import KEYID_PATTERN, parse_envelope

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", dependencies=[Admin])

#: A push whose body is a signed ``module.json`` alone (its blobs uploaded beforehand).
MANIFEST_MEDIA_TYPE = "application/vnd.edgepack.manifest+json"

#: A longer grace than ten years means "never": refuse it rather than overflow the date maths.
MAX_GC_GRACE_S = 10 * 365 * 24 * 3600

DigestPath = Annotated[str, Path(description="sha256:<hex>")]


class FileOut(BaseModel):
    path: str
    digest: str
    size: int


class ModelFileIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        max_length=4096, description="relative path inside the model (a file name, or folder/file)"
    )
    digest: str = Field(max_length=71, description="sha256:<hex> of a blob already uploaded")
    size: Count


class ModelRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: list[ModelFileIn] = Field(min_length=1, max_length=100_000)
    description: Text = ""
    tags: TagMap = Field(default_factory=dict)
    properties: dict[TagKey, Any] = Field(default_factory=dict, max_length=MAX_TAGS)


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set_tags: TagMap = Field(default_factory=dict, description="tags to add or change")
    remove_tags: list[TagKey] = Field(default_factory=list, max_length=MAX_TAGS)
    description: Text | None = None
    properties: dict[TagKey, Any] = Field(
        default_factory=dict, max_length=MAX_TAGS, description="properties to add"
    )


class ModelOut(BaseModel):
    name: str
    version: int
    description: str
    tags: dict[str, str]
    properties: dict[str, Any]
    size: int
    created_at: datetime
    files: list[FileOut]

    @classmethod
    def of(cls, m: ModelVersion) -> ModelOut:
        return cls(
            name=m.name,
            version=m.version,
            description=m.description,
            tags=m.tags,
            properties=m.properties,
            size=m.size,
            created_at=m.created_at,
            files=[FileOut(path=f.path, digest=f.digest, size=f.size) for f in m.files],
        )


class ModuleOut(BaseModel):
    name: str
    version: str
    manifest_digest: str
    signers: list[str]
    size: int
    created_at: datetime
    files: list[FileOut]

    @classmethod
    def of(cls, m: Module) -> ModuleOut:
        return cls(
            name=m.name,
            version=m.version,
            manifest_digest=m.manifest_digest,
            signers=m.signers,
            size=m.size,
            created_at=m.created_at,
            files=[FileOut(path=f.path, digest=f.digest, size=f.size) for f in m.files],
        )


class ModuleDetail(ModuleOut):
    manifest: dict[str, Any] = Field(description="the signed payload of module.json")


class PushOut(ModuleOut):
    created: bool
    new_blobs: int
    reused_blobs: int


class BlobOut(BaseModel):
    digest: str
    size: int
    created: bool


class Deleted(BaseModel):
    deleted: str
    freed_blobs: list[str]


def _binary_body(media_type: str) -> dict[str, Any]:
    """OpenAPI for a raw streamed body (FastAPI cannot infer one it never parses)."""
    content = {media_type: {"schema": {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "content": content}}


def _upload_limit(core: HubCore) -> int:
    return core.settings.max_upload_mb * MIB


# --- blobs ----------------------------------------------------------------------------------

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``Range: bytes=a-b`` as ``[start, end)``; None means the whole blob. Pure."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        raise ConfigError(f"Range {header!r} is not supported; send one 'bytes=START-END' range")
    first, last = match.groups()
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise ConfigError(f"Range {header!r} is outside the blob ({size} bytes)")
    return start, end


#: Blobs up to this size are answered whole rather than streamed.
SMALL_BLOB = 1 << 20


def _chunks(fh: IO[bytes], core: HubCore, digest: str) -> Iterator[bytes]:
    with fh:
        try:
            while chunk := fh.read(CHUNK):
                yield chunk
        except TrustError as exc:
            # The store's copy changed behind the hub's back: the answer is cut off before its
            # end (the client sees a broken transfer, never the whole wrong bytes), and the
            # operator is told which blob to push again.
            log.error("%s", exc)
            with core.sessions.begin() as s:
                record_event(s, "blob-corrupt", str(exc))
            raise


def _whole(fh: IO[bytes], core: HubCore) -> bytes:
    """A small blob read at once, checked like a streamed one (a mismatch sends no byte)."""
    with fh:
        try:
            return fh.read()
        except TrustError as exc:
            log.error("%s", exc)
            with core.sessions.begin() as s:
                record_event(s, "blob-corrupt", str(exc))
            raise


def _check_whole(core: HubCore, digest: str) -> None:
    """Read the whole blob through its digest check before a byte range of it is sent: a range
    cannot be checked alone, and a resumed download must get a refusal (422), not the rest of
    bytes that no longer match. Costs one more read of the blob per range request."""
    with core.blobs.open(digest) as fh:
        try:
            while fh.read(CHUNK):
                pass
        except TrustError as exc:
            log.error("%s", exc)
            with core.sessions.begin() as s:
                record_event(s, "blob-corrupt", str(exc))
            raise


def blob_response(core: HubCore, digest: str, range_header: str | None, media_type: str) -> Response:
    """Stream a blob, or one byte range of it (206), for any route that serves blobs."""
    check_digest(digest)
    size = core.blobs.size(digest)
    span = parse_range(range_header, size)
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{digest}"'}
    if span is None and size <= SMALL_BLOB:
        # Read here, on the route's worker thread: streaming costs a thread hop per chunk, which
        # is most of the work of serving a small file (a fleet's rollout is thousands of them).
        return Response(_whole(core.blobs.open(digest), core), media_type=media_type, headers=headers)
    if span is None:
        headers["Content-Length"] = str(size)
        chunks = _chunks(core.blobs.open(digest), core, digest)
        return StreamingResponse(chunks, media_type=media_type, headers=headers)
    start, end = span
    _check_whole(core, digest)
    headers["Content-Length"] = str(end - start)
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return StreamingResponse(
        _chunks(core.blobs.open(digest, start, end), core, digest),
        status_code=206,
        media_type=media_type,
        headers=headers,
    )


@router.head("/blobs/{digest}", tags=["blobs"])
def head_blob(digest: DigestPath, core: Core) -> Response:
    size = core.blobs.size(check_digest(digest))
    return Response(headers={"Content-Length": str(size), "Accept-Ranges": "bytes"})


@router.get("/blobs/{digest}", tags=["blobs"], response_class=StreamingResponse)
def get_blob(digest: DigestPath, request: Request, core: Core) -> Response:
    """A blob by digest; honours a single ``Range`` header."""
    return blob_response(core, digest, request.headers.get("range"), "application/octet-stream")


@router.put(
    "/blobs/{digest}",
    tags=["blobs"],
    status_code=201,
    response_model=BlobOut,
    openapi_extra=_binary_body("application/octet-stream"),
)
async def put_blob(digest: DigestPath, request: Request, core: Core) -> Any:
    """Upload one blob (raw body); its digest must match. A blob already held intact is not
    rewritten; one whose stored bytes no longer match its digest is replaced."""
    check_digest(digest)
    limit = _upload_limit(core)
    check_declared_length(request.headers.get("content-length"), limit)
    raw, fh = body_file(request.stream(), limit=limit)
    if await run_in_threadpool(holds_intact, core.blobs, digest):
        await raw.drain()
        return JSONResponse(BlobOut(digest=digest, size=core.blobs.size(digest), created=False).model_dump())
    try:
        got, size = await run_in_threadpool(core.blobs.put, fh, expected_digest=digest, max_bytes=limit)
    except EdgepackError:
        await raw.drain()
        raise
    return BlobOut(digest=got, size=size, created=True)


class Collected(BaseModel):
    freed_blobs: list[str]


@router.post("/registry/gc", tags=["blobs"], response_model=Collected)
def collect_garbage(
    core: Core,
    grace_s: Annotated[
        int, Query(ge=0, le=MAX_GC_GRACE_S, description="keep unused blobs younger than this")
    ] = 3600,
) -> Collected:
    """Delete blobs that no model or module uses (uploads never registered, failed pushes)."""
    return Collected(
        freed_blobs=blob_refs.collect_garbage(core.sessions, core.blobs, grace=timedelta(seconds=grace_s))
    )


# --- models ---------------------------------------------------------------------------------


@router.post("/models/{name}/versions", tags=["models"], status_code=201, response_model=ModelOut)
def register_model(name: str, body: ModelRegistration, core: Core) -> ModelOut:
    """Register a new version of model ``name`` over blobs uploaded with ``PUT /blobs``."""
    model = model_registry.register_model(
        core.sessions,
        core.blobs,
        name,
        [model_registry.FileRef(f.path, f.digest, f.size) for f in body.files],
        description=body.description,
        tags=body.tags,
        properties=body.properties,
    )
    return ModelOut.of(model)


@router.get("/models", tags=["models"], response_model=list[ModelOut])
def list_models(
    core: Core,
    tag: Annotated[list[str], Query(description="key=value or key; all must match")] = [],  # noqa: B006
    name: str | None = None,
    latest: Annotated[bool, Query(description="only the highest version of each name")] = False,
) -> list[ModelOut]:
    filters = parse_filters(tag)
    with core.sessions.begin() as s:
        found = model_registry.list_models(s, name=name, filters=filters)
        if latest:
            found = list({m.name: m for m in found}.values())
        return [ModelOut.of(m) for m in found]


@router.get("/models/{name}/versions", tags=["models"], response_model=list[ModelOut])
def list_model_versions(name: str, core: Core) -> list[ModelOut]:
    with core.sessions.begin() as s:
        found = model_registry.list_models(s, name=name)
        if not found:
            model_registry.get_model(s, name)  # raises NotFound with advice
        return [ModelOut.of(m) for m in found]


@router.get("/models/{name}/versions/{version}", tags=["models"], response_model=ModelOut)
def show_model(name: str, version: str, core: Core) -> ModelOut:
    """One version; ``latest`` names the highest."""
    with core.sessions.begin() as s:
        return ModelOut.of(model_registry.get_model(s, name, version))


@router.get("/models/{name}/versions/{version}/files/{path:path}", tags=["models"])
def download_model_file(name: str, version: str, path: str, request: Request, core: Core) -> Response:
    with core.sessions.begin() as s:
        model = model_registry.get_model(s, name, version)
        digest = next((f.digest for f in model.files if f.path == path), None)
    if digest is None:
        raise NotFound(f"model {model.ref} has no file {path!r}; 'edgepack model show' lists them")
    return blob_response(core, digest, request.headers.get("range"), "application/octet-stream")


@router.patch("/models/{name}/versions/{version}", tags=["models"], response_model=ModelOut)
def update_model(name: str, version: str, body: ModelUpdate, core: Core) -> ModelOut:
    """Change tags, description or properties of one version (its files never change)."""
    model = model_registry.update_model(
        core.sessions,
        name,
        version,
        set_tags=body.set_tags,
        remove_tags=body.remove_tags,
        description=body.description,
        properties=body.properties,
    )
    return ModelOut.of(model)


@router.delete("/models/{name}/versions/{version}", tags=["models"], response_model=Deleted)
def delete_model(name: str, version: str, core: Core) -> Deleted:
    """Delete one version; refused (409) while a deployment uses it."""
    freed = model_registry.delete_model(core.sessions, core.blobs, name, version)
    return Deleted(deleted=f"{name}:{version}", freed_blobs=freed)


# --- modules --------------------------------------------------------------------------------


@router.post(
    "/modules",
    tags=["modules"],
    status_code=201,
    response_model=PushOut,
    openapi_extra=_binary_body("application/vnd.edgepack.module+tar"),
)
async def push_module(request: Request, core: Core) -> Any:
    """Push a ``.edgepack`` (raw body). Every signature and blob digest is verified before
    anything is stored; 422 names the problem. The same module again answers 200.

    With ``Content-Type: application/vnd.edgepack.manifest+json`` the body is the signed
    ``module.json`` alone, over blobs already uploaded with ``PUT /blobs`` (409 names one that
    is missing): a client then sends only the files the hub does not hold."""
    if request.headers.get("content-type", "").split(";")[0].strip() == MANIFEST_MEDIA_TYPE:
        limit = BundleLimits().max_manifest_bytes
        check_declared_length(request.headers.get("content-length"), limit)
        raw, fh = body_file(request.stream(), limit=limit)
        data = await run_in_threadpool(fh.read)
        await raw.drain()
        result = await run_in_threadpool(
            module_registry.register_manifest, core.sessions, core.blobs, core.trust, data
        )
        return _push_answer(result)
    limit = _upload_limit(core)
    check_declared_length(request.headers.get("content-length"), limit)
    raw, fh = body_file(request.stream(), limit=limit)
    try:
        result = await run_in_threadpool(
            module_registry.push_module, core.sessions, core.blobs, core.trust, fh
        )
    except EdgepackError:
        await raw.drain()
        raise
    await raw.drain()  # tar padding after the end-of-archive marker
    return _push_answer(result)


def _push_answer(result: module_registry.PushResult) -> Any:
    out = PushOut(
        **ModuleOut.of(result.module).model_dump(),
        created=result.created,
        new_blobs=result.new_blobs,
        reused_blobs=result.reused_blobs,
    )
    if result.created:
        return out
    return JSONResponse(json.loads(out.model_dump_json()), status_code=200)


@router.get("/modules", tags=["modules"], response_model=list[ModuleOut])
def list_modules(core: Core, name: str | None = None) -> list[ModuleOut]:
    with core.sessions.begin() as s:
        return [ModuleOut.of(m) for m in module_registry.list_modules(s, name)]


@router.get("/modules/{name}/versions/{version}", tags=["modules"], response_model=ModuleDetail)
def show_module(name: str, version: str, core: Core) -> ModuleDetail:
    with core.sessions.begin() as s:
        module = module_registry.get_module(s, name, version)
        signed = parse_envelope(module.manifest, what=f"module {module.ref}").signed
        return ModuleDetail(**ModuleOut.of(module).model_dump(), manifest=signed)


def _manifest_response(module: Module) -> Response:
    return Response(
        module.manifest,
        media_type="application/json",
        headers={"ETag": f'"{module.manifest_digest}"', "X-Edgepack-Digest": module.manifest_digest},
    )


@router.get("/modules/{name}/versions/{version}/manifest", tags=["modules"])
def get_module_manifest(name: str, version: str, core: Core) -> Response:
    """The exact signed ``module.json`` bytes that were pushed."""
    with core.sessions.begin() as s:
        return _manifest_response(module_registry.get_module(s, name, version))


@router.get("/manifests/{digest}", tags=["modules"])
def get_manifest_by_digest(digest: DigestPath, core: Core) -> Response:
    with core.sessions.begin() as s:
        return _manifest_response(module_registry.module_by_digest(s, check_digest(digest)))


@router.delete("/modules/{name}/versions/{version}", tags=["modules"], response_model=Deleted)
def delete_module(name: str, version: str, core: Core) -> Deleted:
    """Delete a module version; refused (409) while a deployment uses it."""
    freed = module_registry.delete_module(core.sessions, core.blobs, name, version)
    return Deleted(deleted=f"{name}:{version}", freed_blobs=freed)


# --- who may sign a module name -------------------------------------------------------------

KeyIdPath = Annotated[
    str, Path(description="key id: sha256 of the raw public key, 64 hex", pattern=KEYID_PATTERN)
]


class SignersOut(BaseModel):
    name: str
    owners: list[str] = Field(description="the keys that pushed the name first")
    granted: list[str] = Field(description="keys the admin allowed to sign it too")


class SignerChangeOut(SignersOut):
    keyid: str
    changed: bool = Field(description="False when a granted key could sign the name already")
    issued: dict[str, int] = Field(description="device id → new desired-state generation")
    published: bool | None = Field(description="None when the hub runs without a broker")
    publish_errors: list[str] = Field(default_factory=list)


def _signer_change(fleet_change: Outcome[owners.SignerChange]) -> SignerChangeOut:
    result = fleet_change.result
    return SignerChangeOut(
        name=result.keys.name,
        owners=result.keys.owners,
        granted=result.keys.granted,
        keyid=result.keyid,
        changed=result.changed,
        issued=fleet_change.issued,
        published=fleet_change.applied.published,
        publish_errors=fleet_change.applied.publish_errors,
    )


@router.get("/modules/{name}/signers", tags=["modules"], response_model=SignersOut)
def list_signers(name: str, core: Core) -> SignersOut:
    """The keys that may sign new versions of module ``name``: its owner and the grants."""
    with core.sessions.begin() as s:
        keys = owners.keys_of(s, name)
    return SignersOut(name=name, owners=keys.owners, granted=keys.granted)


@router.put("/modules/{name}/signers/{keyid}", tags=["modules"], response_model=SignerChangeOut)
def grant_signer(name: str, keyid: KeyIdPath, core: Core, fleet: Fleet) -> SignerChangeOut:
    """Allow another key the hub trusts to sign versions of module ``name`` (recorded as an
    event); every device running the name gets a desired state naming the key."""

    def mutate(s: Session) -> owners.SignerChange:
        lock_registry(s)
        return owners.grant(s, core.trust, name, keyid)

    return _signer_change(fleet.change(mutate))


@router.delete("/modules/{name}/signers/{keyid}", tags=["modules"], response_model=SignerChangeOut)
def revoke_signer(name: str, keyid: KeyIdPath, fleet: Fleet) -> SignerChangeOut:
    """Withdraw a grant: versions the key signs later are refused, and devices refuse to start
    a version only it signed."""

    def mutate(s: Session) -> owners.SignerChange:
        lock_registry(s)
        return owners.revoke(s, name, keyid)

    return _signer_change(fleet.change(mutate))
