"""A content-addressed blob store on disk: ``<root>/blobs/sha256/<hex>``.

A blob only ever appears under its final name once its bytes have been written to a temp
file in the same folder, fsynced, and hashed to the digest it claims; then it is renamed into
place. A crash or a digest mismatch leaves at most a ``.part`` temp file, which is removed on
abort and cleaned up by :meth:`BlobStore.remove_stale_parts`. So the presence of a blob's
final name *is* the proof that its content matches its digest.

The store implements :class:`manifests.bundle.BlobSink`, so ``verify_bundle(stream, trust,
sink=store)`` streams a bundle's blobs straight into it; the agent uses the same
``begin``/``write``/``commit``/``abort`` for blobs it downloads one by one. A writer hashes
what it is given unless its caller already does and commits only on a match (see
:meth:`BlobStore.begin`), which spares a second pass over large models.

A resumable download has exactly one writer per blob: a thread lock (per partial file, for the
threads of one agent) and an exclusive ``flock`` on the partial file (for other processes)
make a second fetch of the same blob wait for the first and then find the blob held, instead
of appending a second stream to the same file. Every ``OSError`` leaves as a
:class:`~manifests.errors.CacheError` (temporary), never bare.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

from manifests.digests import digest_hex, is_digest
from manifests.durable import fsync_dir
from manifests.errors import CacheError, FetchError, TrustError

BLOB_DIR = Path("blobs") / "sha256"
PART_SUFFIX = ".part"
#: a download that may be resumed after a crash keeps its bytes under this suffix
PARTIAL_SUFFIX = ".partial"
BLOB_MODE = 0o444  # blobs are hard-linked into module folders; nobody may write through them
#: how often a fetch waiting for another writer of the same blob looks again (and at ``check``)
WAIT_SLICE_S = 0.1


@contextlib.contextmanager
def cache_errors(what: str) -> Iterator[None]:
    """Turn an ``OSError`` into a :class:`CacheError` naming ``what`` (temporary: a full or
    failing disk is fixed without a new module version)."""
    try:
        yield
    except OSError as exc:
        raise CacheError(
            f"{what}: {exc.strerror or type(exc).__name__} ({exc.filename or 'cache'}); "
            "check the device's disk, the download is tried again"
        ) from None


class _WriterSlot:
    """The one thread of this process that may write a partial file; shared by reference count
    so the table of slots only holds blobs being fetched now."""

    _table: ClassVar[dict[str, _WriterSlot]] = {}
    _table_lock = threading.Lock()

    def __init__(self, key: str) -> None:
        self.key = key
        self.lock = threading.Lock()
        self.users = 0

    @classmethod
    def claim(cls, path: Path) -> _WriterSlot:
        with cls._table_lock:
            slot = cls._table.setdefault(str(path), cls(str(path)))
            slot.users += 1
            return slot

    def leave(self) -> None:
        with self._table_lock:
            self.users -= 1
            if self.users == 0:
                self._table.pop(self.key, None)


class BlobStore:
    """The blobs of a cache. Safe for several writers at once: the last rename wins, and
    every candidate has the same bytes."""

    def __init__(self, root: Path) -> None:
        self.dir = root / BLOB_DIR

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it is held)."""
        try:
            return self.dir / digest_hex(digest)
        except ValueError:
            raise TrustError(f"{digest!r} is not a sha256 digest; refused") from None

    def has(self, digest: str) -> bool:
        """True when a regular file holds the blob. A symlink planted under a blob's name is
        never taken for the blob."""
        try:
            st = os.lstat(self.path(digest))
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode)

    def held(self, digest: str, size: int) -> bool:
        """True when the blob is held at its ``size``. Anything else under the blob's name (a
        file of another size, which no commit can have verified) is removed, so that the blob
        is fetched again instead of trusted."""
        found = self.size(digest)
        if found == size:
            return True
        if found is not None or os.path.lexists(self.path(digest)):
            with cache_errors(f"removing a damaged copy of blob {digest}"):
                _unlink_counting(self.path(digest))
        return False

    def size(self, digest: str) -> int | None:
        """The size of a held blob, or ``None`` when it is not held."""
        try:
            st = os.lstat(self.path(digest))
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def begin(self, digest: str, size: int, *, hashed_by_caller: bool = False) -> PendingBlob:
        """Start writing blob ``digest`` of ``size`` bytes; finish with commit() or abort().

        ``hashed_by_caller=True`` is only for a caller that hashes every byte itself and
        commits only on a match (``verify_bundle`` does): the blob is then not hashed twice.
        """
        final = self.path(digest)
        if size < 0:
            raise TrustError(f"blob {digest}: negative size {size}; refused")
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=PART_SUFFIX, dir=self.dir)
        return PendingBlob(
            digest=digest,
            size=size,
            fd=fd,
            tmp=Path(tmp),
            final=final,
            hasher=None if hashed_by_caller else hashlib.sha256(),
        )

    def begin_resumable(
        self, digest: str, size: int, *, check: Callable[[], None] = lambda: None
    ) -> ResumableBlob | None:
        """Start or resume writing blob ``digest`` as its only writer: bytes kept by an
        interrupted download (even one killed with SIGKILL) are taken up again. Finish with
        commit(); abort() keeps the bytes for the next attempt, discard() drops them.

        While another thread or process writes the same blob this waits, calling ``check``
        about every :data:`WAIT_SLICE_S` (it raises to give up: cancelled, past a deadline).
        ``None`` means the blob is held: the other writer finished it, and nothing is left to
        do.
        """
        final = self.path(digest)
        if size < 0:
            raise TrustError(f"blob {digest}: negative size {size}; refused")
        partial = self.partial_path(digest)
        slot = _WriterSlot.claim(partial)
        locked = False
        try:
            while not slot.lock.acquire(timeout=WAIT_SLICE_S):
                check()
            locked = True
            with cache_errors(f"blob {digest}"):
                self.dir.mkdir(parents=True, exist_ok=True)
                fd = self._lock_partial(digest, size, partial, check)
            if fd is None:
                slot.lock.release()
                slot.leave()
                return None
        except BaseException:
            if locked:
                slot.lock.release()
            slot.leave()
            raise
        return ResumableBlob(digest=digest, size=size, partial=partial, final=final, fd=fd, slot=slot)

    def _lock_partial(
        self, digest: str, size: int, partial: Path, check: Callable[[], None]
    ) -> int | None:
        """An fd of the partial file holding its exclusive lock, or None once the blob is held."""
        while True:
            if self.held(digest, size):
                return None
            fd = _open_partial(partial)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # another process writes it: wait for it to finish or die
                check()
                time.sleep(WAIT_SLICE_S)
                continue
            except BaseException:
                os.close(fd)
                raise
            keep = False
            try:
                if not _is_open_at(fd, partial):
                    continue  # renamed into place (or replaced) before the lock was ours
                if self.held(digest, size):
                    # Committed by another process between the check above and the open,
                    # which made a new, empty partial file: it is not needed.
                    partial.unlink()
                    return None
                keep = True
                return fd
            finally:
                if not keep:
                    os.close(fd)

    def partial_path(self, digest: str) -> Path:
        return self.dir / f".{digest_hex(digest)}{PARTIAL_SUFFIX}"

    def partial_size(self, digest: str) -> int:
        """Bytes an interrupted download of ``digest`` left (0 when none)."""
        try:
            st = os.lstat(self.partial_path(digest))
        except FileNotFoundError:
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def partials(self) -> Iterator[str]:
        """Digests of every interrupted download kept for resuming."""
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            name = entry.name
            if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                digest = "sha256:" + name[1 : -len(PARTIAL_SUFFIX)]
                if is_digest(digest):
                    yield digest

    def remove_partial(self, digest: str) -> int:
        return _unlink_counting(self.partial_path(digest))

    def digests(self) -> Iterator[str]:
        """Every blob held (temp files excluded)."""
        if not self.dir.is_dir():
            return
        for entry in os.scandir(self.dir):
            digest = "sha256:" + entry.name
            if is_digest(digest):
                yield digest

    def remove(self, digest: str) -> int:
        """Delete a blob; returns the bytes freed (0 when it was not held)."""
        return _unlink_counting(self.path(digest))

    def remove_stale_parts(self, older_than_s: float) -> int:
        """Delete temp files left by crashed writers; a writer that is still busy keeps its
        file because it is younger than ``older_than_s``."""
        if not self.dir.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in os.scandir(self.dir):
            if entry.name.endswith(PART_SUFFIX) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed


def _unlink_counting(path: Path) -> int:
    """Remove ``path``; the bytes it held (0 when there was nothing)."""
    try:
        size = os.lstat(path).st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _open_partial(partial: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
    try:
        return os.open(partial, flags, 0o600)
    except OSError:
        # A link or something else planted under the name: remove it and start clean.
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            partial.unlink()
        return os.open(partial, flags, 0o600)


def _is_open_at(fd: int, path: Path) -> bool:
    """True when ``fd`` is the file that ``path`` names now."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (named.st_dev, named.st_ino)


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view) :]


class PendingBlob:
    """One blob being written: hashed as it arrives, renamed into place only when it matches.

    Implements :class:`manifests.bundle.BlobWriter`.
    """

    def __init__(
        self,
        *,
        digest: str,
        size: int,
        fd: int,
        tmp: Path,
        final: Path,
        hasher: hashlib._Hash | None,
    ) -> None:
        self.digest = digest
        self.size = size
        self._fd: int | None = fd
        self._tmp = tmp
        self._final = final
        self._hasher = hasher
        self._written = 0

    def __enter__(self) -> PendingBlob:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Commit when the block finished normally (which still checks size and digest);
        discard on any exception."""
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(self, chunk: bytes) -> None:
        fd = self._open_fd()
        self._written += len(chunk)
        if self._written > self.size:
            self.abort()
            raise TrustError(
                f"blob {self.digest}: more than the {self.size} bytes announced; discarded"
            )
        if self._hasher is not None:
            self._hasher.update(chunk)
        with cache_errors(f"blob {self.digest}"):
            _write_all(fd, chunk)

    def commit(self) -> None:
        """Keep the blob if it is complete and matches its digest; otherwise discard it and
        raise :class:`TrustError`."""
        fd = self._open_fd()
        if self._written != self.size:
            self.abort()
            raise TrustError(
                f"blob {self.digest}: got {self._written} bytes, expected {self.size}; discarded"
            )
        if self._hasher is not None and "sha256:" + self._hasher.hexdigest() != self.digest:
            self.abort()
            raise TrustError(f"blob {self.digest}: content does not match its digest; discarded")
        with cache_errors(f"blob {self.digest}"):
            try:
                os.fchmod(fd, BLOB_MODE)
                os.fsync(fd)
                os.close(fd)
                self._fd = None
                os.replace(self._tmp, self._final)
            except BaseException:
                self.abort()
                raise
            fsync_dir(self._final.parent)

    def abort(self) -> None:
        """Discard whatever was written. Safe to call more than once."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def _open_fd(self) -> int:
        if self._fd is None:
            raise TrustError(f"blob {self.digest}: writer already finished")
        return self._fd


class ResumableBlob:
    """A blob downloaded into ``.<hex>.partial``, appended to across attempts and processes,
    by one writer at a time (it holds the file's exclusive lock; see
    :meth:`BlobStore.begin_resumable`).

    :attr:`offset` says where the next byte goes (what the ``Range`` request asks for). The
    bytes already there are hashed again on open, so a blob is only ever renamed into place
    when *all* its bytes, from whichever attempt, match the digest. A partial file longer than
    the blob, or not a regular file, is dropped and the download starts over.
    """

    def __init__(
        self, *, digest: str, size: int, partial: Path, final: Path, fd: int, slot: _WriterSlot
    ) -> None:
        self.digest = digest
        self.size = size
        self._partial = partial
        self._final = final
        self._hasher = hashlib.sha256()
        self._fd: int | None = fd
        self._slot: _WriterSlot | None = slot
        try:
            with cache_errors(f"blob {digest}"):
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > size:
                    os.ftruncate(fd, 0)
                self.offset = self._rehash()
        except BaseException:
            self.abort()
            raise

    def _rehash(self) -> int:
        fd = self._open_fd()
        done = 0
        while chunk := os.pread(fd, 1 << 20, done):
            self._hasher.update(chunk)
            done += len(chunk)
        return done

    def restart(self) -> None:
        """Drop what is there and start from byte 0 (the server ignored the Range request)."""
        with cache_errors(f"blob {self.digest}"):
            os.ftruncate(self._open_fd(), 0)
        self._hasher = hashlib.sha256()
        self.offset = 0

    def write(self, chunk: bytes) -> None:
        fd = self._open_fd()
        if self.offset + len(chunk) > self.size:
            self.discard()
            raise TrustError(f"blob {self.digest}: more than the {self.size} bytes announced; discarded")
        self._hasher.update(chunk)
        with cache_errors(f"blob {self.digest}"):
            _write_all(fd, chunk)
        self.offset += len(chunk)

    def commit(self) -> None:
        """Rename into place if complete and matching; a mismatch discards every byte (they
        can never become right) and raises :class:`TrustError`. The lock is held until the
        blob is under its final name, so a waiting writer then finds it held."""
        fd = self._open_fd()
        if self.offset != self.size:
            # Cut short, not wrong: the bytes are kept and the next attempt resumes.
            raise FetchError(
                f"blob {self.digest}: transfer ended after {self.offset} of {self.size} bytes"
            )
        if "sha256:" + self._hasher.hexdigest() != self.digest:
            self.discard()
            raise TrustError(f"blob {self.digest}: content does not match its digest; discarded")
        with cache_errors(f"blob {self.digest}"):
            os.fchmod(fd, BLOB_MODE)
            os.fsync(fd)
            os.replace(self._partial, self._final)
            fsync_dir(self._final.parent)
        self._release()

    def abort(self) -> None:
        """Stop for now, keeping the bytes for the next attempt."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
        self._release()

    def discard(self) -> None:
        """Stop and forget the bytes (removed while the lock is still ours)."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._partial.unlink()
        self._release()

    def _release(self) -> None:
        """Close the file (which lets another process's writer in), then this process's."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._slot is not None:
            self._slot.lock.release()
            self._slot.leave()
            self._slot = None

    def _open_fd(self) -> int:
        if self._fd is None:
            raise TrustError(f"blob {self.digest}: writer already finished")
        return self._fd
