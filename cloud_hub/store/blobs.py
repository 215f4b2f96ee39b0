"""Content-addressed blob store: every file the hub holds, named by its ``sha256:<hex>``.

Callers see only the :class:`BlobStore` protocol, so an S3-compatible store can replace
:class:`FileBlobStore` without touching them. The file store keeps ``<root>/sha256/<ab>/<hex>``;
every write goes to a temp file in ``<root>/tmp`` first and is renamed into place only once
its digest is known (and, when one was expected, matched), so a reader never sees half a blob
and a crash leaves at most a temp file behind. A blob already held is never written twice.

Pushing a module needs all-or-nothing: :meth:`BlobStore.staging` gives a
:class:`manifests.bundle.BlobSink` whose blobs become visible only on ``publish()``, after
the whole bundle has been verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

from cloud_hub.errors import NotFound, TooLarge
from manifests.digests import digest_hex, is_digest
from manifests.errors import ConfigError, TrustError

CHUNK = 1 << 20


class BlobWriter(Protocol):
    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class BlobStaging(Protocol):
    """A :class:`manifests.bundle.BlobSink` that holds blobs back until :meth:`publish`."""

    def has(self, digest: str) -> bool: ...

    def begin(self, digest: str, size: int) -> BlobWriter: ...

    @property
    def staged(self) -> list[str]:
        """Digests written by this staging area (blobs the store did not hold before)."""

    def publish(self) -> None:
        """Make every staged blob visible in the store."""

    def discard(self) -> None:
        """Forget every staged blob."""


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    stored_at: datetime


class BlobStore(Protocol):
    def put(
        self, stream: IO[bytes], *, expected_digest: str | None = None, max_bytes: int | None = None
    ) -> tuple[str, int]:
        """Store the stream's bytes; return ``(digest, size)``.

        Raises TooLarge past ``max_bytes`` and TrustError when ``expected_digest`` differs;
        in both cases nothing is stored.
        """

    def open(self, digest: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        """Read bytes ``[start, end)`` of a blob (``end`` None = to the end). NotFound if absent."""

    def has(self, digest: str) -> bool: ...

    def size(self, digest: str) -> int:
        """Size in bytes; NotFound if absent."""

    def delete(self, digest: str) -> bool:
        """Remove a blob; True if it was there."""

    def begin(self, digest: str, size: int) -> BlobWriter:
        """Write one blob whose digest is known in advance (a BlobSink)."""

    def staging(self) -> BlobStaging: ...

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob held (for garbage collection)."""

    def clean_partial(self, older_than: datetime) -> int:
        """Remove leftovers of uploads that never finished (a crash mid-write) and have not been
        written to since ``older_than``; return how many."""


def holds_intact(store: BlobStore, digest: str) -> bool:
    """True when ``store`` holds ``digest`` and its bytes still hash to it. Reads the whole
    blob: for uploads and pushes of a blob the store holds, so that bytes changed behind the
    store's back are replaced by the upload instead of kept."""
    if not store.has(digest):
        return False
    try:
        with store.open(digest) as fh:
            while fh.read(CHUNK):
                pass
    except (TrustError, NotFound):
        return False
    return True


def check_digest(digest: str) -> str:
    if not is_digest(digest):
        raise ConfigError(f"{digest!r} is not a blob digest; expected 'sha256:' and 64 hex digits")
    return digest


class _RangeReader(io.RawIOBase):
    """At most ``length`` bytes of an open file (a byte range of a blob)."""

    def __init__(self, fh: io.BufferedReader, length: int) -> None:
        self._fh = fh
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        n = self._fh.readinto(memoryview(buffer)[: self._left])
        self._left -= n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class VerifiedReader(io.RawIOBase):
    """A whole blob, read through a digest check: bytes that do not match are never all served.

    It reads one chunk ahead and hands out the last chunk only after the digest of everything
    matched, so a blob changed behind the store's back (a flipped bit on disk, an object
    overwritten in the bucket) ends in a :class:`TrustError` before its end: an HTTP client
    sees a cut-off answer, never the whole wrong content.
    """

    def __init__(self, raw: IO[bytes], digest: str) -> None:
        self._raw = raw
        self._digest = digest
        self._hasher = hashlib.sha256()
        self._ahead = self._next()
        self._out = memoryview(b"")

    def _next(self) -> bytes:
        chunk = self._raw.read(CHUNK)
        self._hasher.update(chunk)
        return chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if not self._out:
            if not self._ahead:
                return 0
            following = self._next()
            if not following and "sha256:" + self._hasher.hexdigest() != self._digest:
                raise TrustError(
                    f"blob {self._digest} in the store does not match its digest; it is not served "
                    "(push or upload it again to replace it)"
                )
            self._out, self._ahead = memoryview(self._ahead), following
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _FileWriter:
    """Writes one blob to a temp file, hashing as it goes; ``commit`` renames it into place."""

    def __init__(
        self,
        tmp_dir: Path,
        final: Path,
        digest: str,
        size: int | None,
        on_commit: Callable[[str], None] | None = None,
    ) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="blob-", suffix=".part", dir=tmp_dir)
        self._fh = os.fdopen(fd, "wb")
        self._tmp = Path(name)
        self._final = final
        self._digest = digest
        self._size = size
        self._hasher = hashlib.sha256()
        self._written = 0
        self._on_commit = on_commit

    def write(self, chunk: bytes) -> None:
        self._written += len(chunk)
        if self._size is not None and self._written > self._size:
            raise TrustError(f"blob {self._digest} is longer than its declared {self._size} bytes")
        self._hasher.update(chunk)
        self._fh.write(chunk)

    def _finish(self) -> None:
        """Close and check the temp file; it is then ready to be renamed into place."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        got = "sha256:" + self._hasher.hexdigest()
        if got != self._digest:
            raise TrustError(f"blob content has digest {got}, expected {self._digest}")

    def commit(self) -> None:
        try:
            self._finish()
            self._final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp, self._final)
        except BaseException:
            self.abort()
            raise
        if self._on_commit is not None:
            self._on_commit(self._digest)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


class _FileStaging:
    """Blobs of one push, kept in a private directory until the whole push has verified."""

    def __init__(self, store: FileBlobStore) -> None:
        self._store = store
        self._dir = store.root / "tmp" / f"stage-{uuid.uuid4().hex}"
        self._dir.mkdir(parents=True)
        self._staged: list[str] = []

    @property
    def staged(self) -> list[str]:
        return list(self._staged)

    def has(self, digest: str) -> bool:
        # A held blob whose bytes no longer match is not held: the push's copy replaces it.
        return digest in self._staged or holds_intact(self._store, digest)

    def begin(self, digest: str, size: int) -> BlobWriter:
        check_digest(digest)
        final = self._dir / digest_hex(digest)
        return _FileWriter(self._dir, final, digest, size, on_commit=self._staged.append)

    def publish(self) -> None:
        for digest in self._staged:
            final = self._store.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._dir / digest_hex(digest), final)
        shutil.rmtree(self._dir, ignore_errors=True)

    def discard(self) -> None:
        self._staged.clear()
        shutil.rmtree(self._dir, ignore_errors=True)


class FileBlobStore:
    """A :class:`BlobStore` in a local directory (the default, and what tests use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hex_ = digest_hex(check_digest(digest))
        return self.root / "sha256" / hex_[:2] / hex_

    def has(self, digest: str) -> bool:
        return is_digest(digest) and self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not held by this hub") from None

    def open(self, digest: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        try:
            fh = self.path(digest).open("rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not held by this hub") from None
        if start == 0 and end is None:
            return io.BufferedReader(VerifiedReader(fh, digest), buffer_size=CHUNK)
        total = os.fstat(fh.fileno()).st_size
        stop = total if end is None else min(end, total)
        if start < 0 or start > stop:
            fh.close()
            raise ConfigError(f"byte range {start}-{end} is outside blob {digest} ({total} bytes)")
        fh.seek(start)
        return io.BufferedReader(_RangeReader(fh, stop - start), buffer_size=CHUNK)

    def put(
        self, stream: IO[bytes], *, expected_digest: str | None = None, max_bytes: int | None = None
    ) -> tuple[str, int]:
        if expected_digest is not None:
            check_digest(expected_digest)
        fd, name = tempfile.mkstemp(prefix="put-", suffix=".part", dir=self._tmp)
        tmp = Path(name)
        try:
            hasher = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge(
                            f"upload is larger than the hub's limit of {max_bytes} bytes; "
                            "raise EDGEPACK_HUB_MAX_UPLOAD_MB on the hub if this is intended"
                        )
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + hasher.hexdigest()
            if expected_digest is not None and digest != expected_digest:
                raise TrustError(
                    f"uploaded bytes have digest {digest}, not {expected_digest}; "
                    "the file changed or was damaged in transit, upload it again"
                )
            final = self.path(digest)
            # Checked bytes replace whatever is held under the name (the same bytes, or a copy
            # changed behind the store's back); the new mtime restarts the gc grace period.
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            return digest, size
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def begin(self, digest: str, size: int) -> BlobWriter:
        return _FileWriter(self._tmp, self.path(digest), digest, size)

    def delete(self, digest: str) -> bool:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def staging(self) -> BlobStaging:
        return _FileStaging(self)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        for path in (self.root / "sha256").glob("*/*"):
            digest = "sha256:" + path.name
            if not is_digest(digest):
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted while listing
                st = path.stat()
                yield BlobInfo(digest, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def clean_partial(self, older_than: datetime) -> int:
        removed = 0
        for path in list(self._tmp.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                if _last_activity(path) >= older_than:
                    continue
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
                removed += 1
        return removed


def _last_activity(path: Path) -> datetime:
    """When ``path`` (a temp file, or a push's staging folder and what is in it) last changed:
    a folder's own time moves only when a file is added, not while one is being written."""
    latest = path.stat().st_mtime
    if path.is_dir():
        for child in path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                latest = max(latest, child.stat().st_mtime)
    return datetime.fromtimestamp(latest, UTC)
