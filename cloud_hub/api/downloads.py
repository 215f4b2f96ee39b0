"""Device downloads of manifests and blobs, answered before FastAPI's machinery.

A fleet's rollout is thousands of ``GET /api/v1/device/manifests/<digest>`` and
``/blobs/<digest>``; through FastAPI and a database session each cost the hub about 3 ms of
CPU. This ASGI layer answers them itself:

- **who may fetch what** comes from :class:`cloud_hub.fleet.grants.DownloadGrants` (no
  database on a hit; a miss, a digest the grant does not name, or a grant older than
  ``download_grant_ttl_s`` asks the database again, off the event loop);
- **manifests** are immutable: their bytes are kept (``download_cache_modules``);
- **blobs** in the file store are read straight from their file, ``Range`` honoured; each file
  is checked against its digest the first time this process serves it (and again when the file
  is replaced), so a copy damaged before it was served is refused (422, a ``blob-corrupt``
  event) as before; the device checks every digest itself in any case;
- **blobs in S3** are streamed through the hub as before (checked on the way), after the
  same fast decision.

With ``download_offload = "nginx"`` (the hub behind ``edgepack hub nginx-config``) the hub only
decides and nginx sends the bytes; no blob byte passes through Python, and the device still
checks every digest:

- **file store**: the file is checked against its digest as above (once per file), then the
  answer is ``X-Accel-Redirect`` to nginx's ``internal`` location :data:`ACCEL_FILES` plus a
  path made from the digest alone (never from the request), which nginx serves from the same
  folder, ``Range`` and all;
- **S3**: ``X-Accel-Redirect`` to :data:`ACCEL_S3` with a presigned GET of the object
  (``download_url_ttl_s``), which nginx fetches (``Range`` passed on) without the device's token.

Every refusal is the same JSON error as FastAPI's handlers give (:func:`error_response`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud_hub.api.device_auth import INVALID_TOKEN
from cloud_hub.api.errors import error_response
from cloud_hub.api.registry import blob_response, parse_range
from cloud_hub.balancer.nginx import ACCEL_FILES, ACCEL_S3
from cloud_hub.core import HubCore
from cloud_hub.errors import Forbidden, NotFound, Unauthorized
from cloud_hub.events import record_event
from cloud_hub.fleet.devices import token_hash
from cloud_hub.fleet.grant_source import DatabaseGrants
from cloud_hub.fleet.grants import DownloadGrants, Grant, Verdict
from cloud_hub.store.blobs import CHUNK, FileBlobStore, check_digest
from manifests.digests import digest_hex
from manifests.errors import EdgepackError, TrustError

_PATH = re.compile(r"^/api/v1/device/(manifests|blobs)/([^/]+)$")

#: Blob answers up to this size are read in one go on the event loop (a page-cache read of a
#: few hundred KiB takes microseconds; a thread hop costs more); larger ones in CHUNKs off it.
INLINE_BYTES = 256 << 10

_NO_STATE = "device {!r} has no desired state yet"


@dataclass(frozen=True)
class _Route:
    """What the request-latency histogram labels these answers with (cloud_hub.metrics)."""

    path_format: str


_ROUTES = {
    "manifests": _Route("/api/v1/device/manifests/{digest}"),
    "blobs": _Route("/api/v1/device/blobs/{digest}"),
}


class QuietDownloads(logging.Filter):
    """Leaves device downloads that succeeded out of uvicorn's access log: a rollout is a few
    of them per device (thousands of lines saying the same), and writing each line cost the hub
    more CPU than answering the request. Refusals and everything else are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn's access record: (client, method, path, http version, status)
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[4], int) and args[4] < 400:
            return not (isinstance(args[2], str) and _PATH.match(args[2].partition("?")[0]))
        return True


class _Lru:
    """A bounded map, least recently used out first; thread-safe."""

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> object | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: object) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._bound:
                self._items.popitem(last=False)


@dataclass
class _Served:
    """One hub process's download state: grants, manifest bytes, checked files, S3 URLs."""

    core: HubCore
    grants: DownloadGrants
    source: DatabaseGrants
    manifests: _Lru
    checked: _Lru
    urls: _Lru


class DeviceDownloads:
    """ASGI middleware: answers device manifest and blob GETs, passes everything else on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._served: _Served | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "GET" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        kind, digest = match.groups()
        scope["route"] = _ROUTES[kind]
        served = self._state(scope)
        try:
            if kind == "manifests":
                await _send_manifest(served, _token(scope), digest, send)
            else:
                await _send_blob(served, _token(scope), digest, scope, receive, send)
        except EdgepackError as exc:
            await error_response(exc)(scope, receive, send)

    def _state(self, scope: Scope) -> _Served:
        hub = scope["app"].state.hub
        if self._served is None or self._served.core is not hub.core:
            settings = hub.core.settings
            self._served = _Served(
                core=hub.core,
                grants=hub.grants,
                source=DatabaseGrants(hub.core.sessions),
                manifests=_Lru(settings.download_cache_modules),
                checked=_Lru(settings.download_cache_blobs),
                urls=_Lru(settings.download_cache_blobs),
            )
        return self._served


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value).decode("latin-1")
    return None


def _token(scope: Scope) -> str:
    scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("device token required: send 'Authorization: Bearer <device token>'")
    return token.strip()


# --- deciding ----------------------------------------------------------------------------------


async def _load(served: _Served, hashed: str) -> Grant:
    as_of, loaded_at = served.grants.epoch, served.grants.now()
    loaded = await anyio.to_thread.run_sync(served.source.grant, hashed)
    if loaded is None:
        raise Unauthorized(INVALID_TOKEN)
    return served.grants.remember(hashed, *loaded, as_of=as_of, loaded_at=loaded_at)


async def _allowed(served: _Served, token: str, kind: Literal["manifests", "blobs"], digest: str) -> None:
    """Raise unless the token's device may fetch ``digest`` now (401, 404, 400, 403 in the
    order the routes always answered them)."""
    grants, hashed = served.grants, token_hash(token)
    grant, fresh = grants.cached(hashed), False
    if grant is None:
        grant, fresh = await _load(served, hashed), True
    for attempt in (1, 2):
        if grant.manifests is None:
            raise NotFound(_NO_STATE.format(grant.device_id))
        check_digest(digest)
        if kind == "manifests":
            verdict = grants.manifest_verdict(grant, digest, fresh=fresh)
        else:
            missing = grants.missing_modules(grant)
            if missing:
                loaded = await anyio.to_thread.run_sync(served.source.module_blobs, missing)
                grants.remember_blobs(loaded)
                if any(digest in blobs for blobs in loaded.values()):
                    return
            verdict = grants.blob_verdict(grant, digest, fresh=fresh)
            if verdict is Verdict.ASK_AGAIN and fresh:
                verdict = Verdict.REFUSED  # every module's blobs were just loaded: none has it
        if verdict is Verdict.ALLOWED:
            return
        if verdict is Verdict.REFUSED or attempt == 2:
            break
        grant, fresh = await _load(served, hashed), True
    if kind == "manifests":
        raise Forbidden(f"manifest {digest} is not named by device {grant.device_id!r}'s desired state")
    raise Forbidden(f"blob {digest} is not part of a module in device {grant.device_id!r}'s desired state")


# --- answering ---------------------------------------------------------------------------------


async def _send_manifest(served: _Served, token: str, digest: str, send: Send) -> None:
    await _allowed(served, token, "manifests", digest)
    manifest = served.manifests.get(digest)
    if manifest is None:
        manifest = await anyio.to_thread.run_sync(served.source.manifest, digest)
        if manifest is None:
            raise NotFound(f"no module with manifest digest {digest} is in the registry")
        served.manifests.put(digest, manifest)
    assert isinstance(manifest, bytes)
    await _start(send, 200, len(manifest), b"application/json", [])
    await send({"type": "http.response.body", "body": manifest})


async def _start(
    send: Send, status: int, length: int, media: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [(b"content-type", media), (b"content-length", str(length).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _send_blob(
    served: _Served, token: str, digest: str, scope: Scope, receive: Receive, send: Send
) -> None:
    range_header = _header(scope, b"range")
    await _allowed(served, token, "blobs", digest)
    store = served.core.blobs
    offload = served.core.settings.download_offload == "nginx"
    if isinstance(store, FileBlobStore) and offload:
        await _redirect_file(served, store, digest, send)
        return
    if isinstance(store, FileBlobStore):
        await _send_file(served, store, digest, range_header, receive, send)
        return
    if offload:
        cached = served.urls.get(digest)
        if isinstance(cached, tuple) and cached[1] > time.monotonic():
            target = cached[0]
        else:
            target = await anyio.to_thread.run_sync(_presign, served, digest)
        await _accel(send, target, digest)
        return
    # S3: streamed through the hub, checked on the way (cloud_hub.api.registry).
    response = await anyio.to_thread.run_sync(
        blob_response, served.core, digest, range_header, "application/octet-stream"
    )
    await response(scope, receive, send)


async def _accel(send: Send, target: str, digest: str) -> None:
    """The answer nginx replaces with what its internal location ``target`` serves."""
    accel = [(b"x-accel-redirect", target.encode()), (b"etag", f'"{digest}"'.encode())]
    await _start(send, 200, 0, b"application/octet-stream", accel)
    await send({"type": "http.response.body", "body": b""})


async def _redirect_file(served: _Served, store: FileBlobStore, digest: str, send: Send) -> None:
    """Check the file as :func:`_send_file` does, then let nginx send it. The target is built
    from the (validated) digest alone, the same way :meth:`FileBlobStore.path` names the file."""
    try:
        fd = os.open(store.path(digest), os.O_RDONLY)
    except FileNotFoundError:
        raise NotFound(f"blob {digest} is not held by this hub") from None
    try:
        await _check_once(served, fd, os.fstat(fd), digest)
    finally:
        os.close(fd)
    hex_ = digest_hex(digest)
    await _accel(send, f"{ACCEL_FILES}{hex_[:2]}/{hex_}", digest)


async def _check_once(served: _Served, fd: int, st: os.stat_result, digest: str) -> None:
    """The open blob file against its digest, unless this file (same inode, size and
    modification time) was checked before (security.md §10)."""
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if served.checked.get(digest) != identity:
        await anyio.to_thread.run_sync(_check_file, served.core, fd, digest)
        served.checked.put(digest, identity)


def _presign(served: _Served, digest: str) -> str:
    """nginx's internal path for a presigned GET of the blob, kept for half the URL's life so
    that one signature serves a rollout (it never leaves nginx: the device sees only the bytes)."""
    from cloud_hub.store.s3 import S3BlobStore

    store = served.core.blobs
    assert isinstance(store, S3BlobStore)
    ttl = served.core.settings.download_url_ttl_s
    url = store.client.generate_presigned_url(
        "get_object", Params={"Bucket": store.location.bucket, "Key": store.key(digest)}, ExpiresIn=ttl
    )
    parts = urlsplit(url)
    target = f"{ACCEL_S3.rstrip('/')}{parts.path}?{parts.query}"
    served.urls.put(digest, (target, time.monotonic() + ttl / 2))
    return target


async def _send_file(
    served: _Served,
    store: FileBlobStore,
    digest: str,
    range_header: str | None,
    receive: Receive,
    send: Send,
) -> None:
    try:
        fd = os.open(store.path(digest), os.O_RDONLY)
    except FileNotFoundError:
        raise NotFound(f"blob {digest} is not held by this hub") from None
    try:
        st = os.fstat(fd)
        span = parse_range(range_header, st.st_size)
        await _check_once(served, fd, st, digest)
        extra = [(b"accept-ranges", b"bytes"), (b"etag", f'"{digest}"'.encode())]
        start, end = (0, st.st_size) if span is None else span
        if span is not None:
            extra.append((b"content-range", f"bytes {start}-{end - 1}/{st.st_size}".encode()))
        media = b"application/octet-stream"
        await _start(send, 200 if span is None else 206, end - start, media, extra)
        if end - start <= INLINE_BYTES:
            await send({"type": "http.response.body", "body": os.pread(fd, end - start, start)})
            return
        await _stream(fd, start, end, receive, send)
    finally:
        os.close(fd)


async def _stream(fd: int, start: int, end: int, receive: Receive, send: Send) -> None:
    """Bytes ``[start, end)`` of the file in CHUNKs read off the event loop, until the client
    goes: uvicorn's ``send`` returns quietly once it has, so a device that gave up on a large
    blob would otherwise cost the hub a read of the rest of it."""
    gone = anyio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        at = start
        while at < end and not gone.is_set():
            chunk = await anyio.to_thread.run_sync(os.pread, fd, min(CHUNK, end - at), at)
            if not chunk:
                break  # the file shrank under us: the short answer is refused by the device
            at += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": at < end})
        tasks.cancel_scope.cancel()


def _check_file(core: HubCore, fd: int, digest: str) -> None:
    """The whole file against its digest (once per file, see the module docs)."""
    hasher, at = hashlib.sha256(), 0
    while chunk := os.pread(fd, CHUNK, at):
        hasher.update(chunk)
        at += len(chunk)
    if "sha256:" + hasher.hexdigest() != digest:
        message = (
            f"blob {digest} in the store does not match its digest; it is not served "
            "(push or upload it again to replace it)"
        )
        with core.sessions.begin() as s:
            record_event(s, "blob-corrupt", message)
        raise TrustError(message)
