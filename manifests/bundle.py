"""Reading and verifying the single-file module form ``*.edgepack``.

A bundle is an uncompressed tar holding ``module.json`` first, then one member
``blobs/sha256/<hex>`` per distinct file content. :func:`verify_bundle` reads it as a stream,
never trusting a member name, type or size: the signed manifest is checked first, and every
blob must be one the manifest names, of the size it names, with the digest it names. Blob
bytes go to a :class:`BlobSink` that may keep them only once their digest has been confirmed;
where the sink writes (a cache, a hub store, nowhere) is the caller's business.

The tar headers are read by :mod:`manifests.tar_stream`, not ``tarfile``, so that every header
is bounded the same way on every Python patch level.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol

from manifests.errors import TrustError
from manifests.module import check_relative_path
from manifests.signing import UNTRUSTED_HINT, TrustStore
from manifests.tar_stream import TarFormatError, TarMember, TarReader
from manifests.verified import VerifiedModule, parse_module_manifest

MANIFEST_NAME = "module.json"
BLOB_PREFIX = "blobs/sha256/"
_BLOB_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
CHUNK = 1 << 20

@dataclass(frozen=True)
class BundleLimits:
    max_manifest_bytes: int = 4 << 20
    max_total_bytes: int = 64 << 30
    max_files: int = 100_000


class BlobSink(Protocol):
    """Receives blob bytes while they are verified."""

    def has(self, digest: str) -> bool:
        """True when the blob is already held, so its bytes need not be written again."""

    def begin(self, digest: str, size: int) -> BlobWriter: ...


class BlobWriter(Protocol):
    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> None:
        """The digest matched: keep the blob."""

    def abort(self) -> None:
        """The digest did not match or reading failed: discard what was written."""


def _member_problem(member: TarMember) -> str | None:
    try:
        check_relative_path(member.name)
    except ValueError as exc:
        return str(exc)
    if not member.isreg():
        kind = (
            "symlink"
            if member.issym()
            else "hard link"
            if member.islnk()
            else "non-regular entry"
        )
        return f"{kind} {member.name!r} is not allowed"
    return None


def verify_bundle(
    stream: IO[bytes],
    trust: TrustStore,
    *,
    sink: BlobSink | None = None,
    limits: BundleLimits = BundleLimits(),
    progress: Callable[[int], None] | None = None,
    what: str = "bundle",
    untrusted_hint: str = UNTRUSTED_HINT,
) -> VerifiedModule:
    """Verify a bundle read from ``stream``; raise :class:`TrustError` naming the first problem.

    ``progress`` is called with the number of bytes of each chunk hashed.
    """
    reader = TarReader(stream)
    verified: VerifiedModule | None = None
    seen: set[str] = set()
    try:
        for member in reader.members():
            problem = _member_problem(member)
            if problem:
                raise TrustError(f"{what}: {problem}; refused")
            if verified is None:
                if member.name != MANIFEST_NAME:
                    raise TrustError(
                        f"{what}: first member is {member.name!r}, expected {MANIFEST_NAME}"
                    )
                if member.size > limits.max_manifest_bytes:
                    raise TrustError(f"{what}: {MANIFEST_NAME} is larger than allowed")
                data = reader.read_all(limits.max_manifest_bytes)
                verified = parse_module_manifest(data, trust, what=what, untrusted_hint=untrusted_hint)
                if len(verified.manifest.files) > limits.max_files:
                    raise TrustError(f"{what}: more files than allowed ({limits.max_files})")
                if verified.manifest.total_size() > limits.max_total_bytes:
                    raise TrustError(f"{what}: module is larger than allowed")
                continue
            match = _BLOB_RE.fullmatch(member.name)
            if not match:
                raise TrustError(f"{what}: unexpected member {member.name!r}; refused")
            digest = "sha256:" + match.group(1)
            if digest in seen:
                raise TrustError(f"{what}: blob {digest} appears twice")
            expected = verified.blob_sizes.get(digest)
            if expected is None:
                raise TrustError(f"{what}: blob {digest} is not named by the signed manifest")
            if member.size != expected:
                raise TrustError(
                    f"{what}: blob {digest} has {member.size} bytes, the manifest says {expected}"
                )
            seen.add(digest)
            _check_blob(reader, member, digest, sink, progress, what)
    except TarFormatError as exc:
        kind = "damaged archive" if verified is not None else "not a module bundle"
        raise TrustError(f"{what}: {kind} ({exc})") from None
    if verified is None:
        raise TrustError(f"{what}: empty archive, no {MANIFEST_NAME}")
    missing = sorted(set(verified.blob_sizes) - seen)
    if missing:
        raise TrustError(f"{what}: blob {missing[0]} named by the manifest is missing")
    return verified


def _check_blob(
    reader: TarReader,
    member: TarMember,
    digest: str,
    sink: BlobSink | None,
    progress: Callable[[int], None] | None,
    what: str,
) -> None:
    writer = sink.begin(digest, member.size) if sink is not None and not sink.has(digest) else None
    hasher = hashlib.sha256()
    try:
        for chunk in reader.read_member(CHUNK):
            hasher.update(chunk)
            if writer is not None:
                writer.write(chunk)
            if progress is not None:
                progress(len(chunk))
        if "sha256:" + hasher.hexdigest() != digest:
            raise TrustError(f"{what}: content of blob {digest} does not match its digest")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.commit()


# --- writing --------------------------------------------------------------------------------

_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _header(name: str, size: int) -> bytes:
    # Fixed owner, mode and time: the same content always gives the same bytes.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_bundle(
    out: IO[bytes],
    manifest_bytes: bytes,
    blobs: list[tuple[str, int, Callable[[], IO[bytes]]]],
    *,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a bundle: ``module.json`` then each ``(digest, size, open_blob)`` sorted by digest.

    Writes the tar stream itself (instead of ``tarfile.addfile``) to copy in large chunks.
    """
    out.write(_header(MANIFEST_NAME, len(manifest_bytes)))
    out.write(manifest_bytes)
    out.write(_ZERO_BLOCK[: -len(manifest_bytes) % tarfile.BLOCKSIZE])
    for digest, size, open_blob in sorted(blobs, key=lambda b: b[0]):
        out.write(_header(BLOB_PREFIX + digest.split(":", 1)[1], size))
        copied = 0
        with open_blob() as src:
            while chunk := src.read(CHUNK):
                copied += len(chunk)
                if copied > size:
                    break
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        if copied != size:
            raise TrustError(f"blob {digest} changed size while being written; build again")
        out.write(_ZERO_BLOCK[: -size % tarfile.BLOCKSIZE])
    out.write(_ZERO_BLOCK * 2)
