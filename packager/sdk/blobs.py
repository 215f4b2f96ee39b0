"""Moving files to and from the hub's content-addressed blob store.

Uploads stream from disk, and only for blobs the hub does not hold (a HEAD first); a file
that changes while it is sent no longer matches its digest and the hub refuses it. Downloads
are written under a temporary name, checked against their digest and only then renamed into
place, so a failed or tampered download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from manifests.errors import FetchError, TrustError
from packager.files import atomic_output
from packager.sdk.progress import Tracker
from packager.sdk.transport import Transport

CHUNK = 1 << 20


def read_chunks(path: Path, progress: Callable[[int], None]) -> Iterator[bytes]:
    """The file's bytes in chunks, reporting each chunk's size."""
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            progress(len(chunk))
            yield chunk


def file_digest(path: Path, progress: Callable[[int], None]) -> str:
    """``sha256:<hex>`` of a file, read in chunks."""
    hasher = hashlib.sha256()
    for chunk in read_chunks(path, progress):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def upload_blob(transport: Transport, path: Path, digest: str, progress: Callable[[int], None]) -> bool:
    """Upload a file unless the hub holds its blob already; True when bytes were sent."""
    if transport.exists(f"/api/v1/blobs/{digest}"):
        return False
    size = path.stat().st_size
    # An explicit Content-Length lets the hub refuse an oversized file before it is sent.
    transport.request(
        "PUT",
        f"/api/v1/blobs/{digest}",
        content=read_chunks(path, progress),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
    )
    return True


def upload_missing(transport: Transport, files: dict[str, Path], tracker: Tracker) -> int:
    """Upload each ``digest → file`` the hub lacks; how many were sent. The tracker counts
    every file's bytes, sent or already there."""
    sent = 0
    for digest, path in files.items():
        if upload_blob(transport, path, digest, tracker.advance):
            sent += 1
        else:
            tracker.advance(path.stat().st_size)
    return sent


def download_blob(
    transport: Transport, url: str, target: Path, digest: str, progress: Callable[[int], None]
) -> None:
    """Stream a blob to ``target``; the file appears only once its digest has matched."""
    hasher = hashlib.sha256()
    try:
        with transport.stream("GET", url) as response, atomic_output(target) as out:
            for chunk in response.iter_bytes(CHUNK):
                hasher.update(chunk)
                out.write(chunk)
                progress(len(chunk))
            if "sha256:" + hasher.hexdigest() != digest:
                raise TrustError(f"{target.name}: downloaded bytes do not match {digest}; download again")
    except (OSError, ValueError) as exc:
        raise FetchError(f"downloading {url} failed ({exc}); try again") from None


def download_blobs(transport: Transport, wanted: Iterable[tuple[str, Path]], tracker: Tracker) -> None:
    """Download each ``(digest, target)`` in turn, counting bytes on one tracker."""
    for digest, target in wanted:
        download_blob(transport, f"/api/v1/blobs/{digest}", target, digest, tracker.advance)
