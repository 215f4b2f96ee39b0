"""A :class:`~cloud_hub.store.blobs.BlobStore` in an S3-compatible bucket (boto3).

``--blob-store s3://BUCKET?endpoint=URL[&prefix=P][&region=R]``; credentials come from the
usual AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, or any source boto3
reads). Every hub replica pointed at the same bucket sees the same blobs.

Layout: a blob is the object ``<prefix>sha256/<hex>``. Nothing half-written or unchecked is
ever visible there:

- A blob is streamed as a *multipart upload* to its final key, hashed as it goes; the upload is
  completed (which is what makes an S3 object appear, all at once) only after the digest and
  size matched, and aborted otherwise. A blob smaller than one part is sent with a single
  ``PutObject`` after the check, from the one part held in memory.
- A push's blobs (:meth:`S3BlobStore.staging`) are uploaded the same way but their multipart
  uploads are completed only on ``publish()``, after the whole bundle verified.
- An upload whose digest is not known in advance goes to ``<prefix>uploads/<uuid>`` first and
  is copied into place server-side once its digest is known.

A crash leaves at most unfinished multipart uploads and ``uploads/`` objects behind;
:meth:`S3BlobStore.clean_partial` (run by garbage collection) aborts and deletes them.
A store that cannot be reached raises :class:`~manifests.errors.FetchError`, so a push fails
with 502 and nothing stored, and the same push succeeds once the store is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from cloud_hub.errors import NotFound, TooLarge
from cloud_hub.store.blobs import (
    BlobInfo,
    BlobStaging,
    BlobWriter,
    VerifiedReader,
    check_digest,
    holds_intact,
)
from manifests.digests import digest_hex, is_digest
from manifests.errors import ConfigError, FetchError, TrustError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Bytes per multipart part (S3 wants at least 5 MiB for every part but the last).
PART_BYTES = 8 << 20


@dataclass(frozen=True)
class S3Location:
    """Where the blobs are: parsed from ``s3://BUCKET?endpoint=URL&prefix=P&region=R``."""

    bucket: str
    endpoint: str | None = None
    prefix: str = ""
    region: str | None = None

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.path not in ("", "/"):
            raise ConfigError(f"blob store {url!r}: write it as s3://BUCKET?endpoint=URL")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(query) - {"endpoint", "prefix", "region"}
        if unknown:
            raise ConfigError(
                f"blob store {url!r}: unknown option {sorted(unknown)[0]!r} (endpoint, prefix, region)"
            )
        prefix = query.get("prefix", "").strip("/")
        return cls(
            bucket=parts.netloc,
            endpoint=query.get("endpoint") or None,
            prefix=f"{prefix}/" if prefix else "",
            region=query.get("region") or None,
        )


@contextlib.contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Turn boto3's transport and service errors into one-line FetchErrors (502)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise FetchError(
            f"blob store refused {what}: {error.get('Code', '?')} {error.get('Message', '')}".rstrip()
            + "; check the bucket and the hub's S3 credentials"
        ) from None
    except BotoCoreError as exc:
        raise FetchError(f"blob store unreachable while {what}: {exc}; retry when it is back") from None


def is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class BodyReader(io.RawIOBase):
    """A botocore streaming body as a raw file (closed with the response)."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        with s3_errors("reading a blob"):
            data: bytes = self._body.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


class _S3Writer:
    """Streams one blob to ``key``; the object appears only once its digest has matched.

    With ``defer`` the finished upload is left open (``finish`` returns it) for a staging area
    to complete on publish.
    """

    def __init__(self, store: S3BlobStore, key: str, digest: str | None, size: int | None) -> None:
        self._store = store
        self._key = key
        self._digest = digest
        self._size = size
        self._hasher = hashlib.sha256()
        self._buffer = bytearray()
        self._written = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.got: str | None = None

    def write(self, chunk: bytes) -> None:
        self._written += len(chunk)
        if self._size is not None and self._written > self._size:
            raise TrustError(f"blob {self._digest} is longer than its declared {self._size} bytes")
        self._hasher.update(chunk)
        self._buffer += chunk
        while len(self._buffer) >= PART_BYTES:
            self._send_part(bytes(self._buffer[:PART_BYTES]))
            del self._buffer[:PART_BYTES]

    def _client(self) -> S3Client:
        return self._store.client

    def _send_part(self, data: bytes) -> None:
        bucket = self._store.location.bucket
        with s3_errors(f"uploading {self._key}"):
            if self._upload_id is None:
                self._upload_id = self._client().create_multipart_upload(Bucket=bucket, Key=self._key)[
                    "UploadId"
                ]
            number = len(self._parts) + 1
            answer = self._client().upload_part(
                Bucket=bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=data
            )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def _check(self) -> str:
        got = "sha256:" + self._hasher.hexdigest()
        if self._digest is not None and got != self._digest:
            raise TrustError(f"blob content has digest {got}, expected {self._digest}")
        if self._size is not None and self._written != self._size:
            raise TrustError(f"blob {self._digest} has {self._written} bytes, declared {self._size}")
        self.got = got
        return got

    def finish(self) -> _PendingObject:
        """Check the digest and send what is left, without making the object visible."""
        try:
            self._check()
            if self._upload_id is None and not self._buffer:
                return _PendingObject(self._store, self._key, None, [])
            if self._buffer or not self._parts:
                self._send_part(bytes(self._buffer))
                self._buffer.clear()
            assert self._upload_id is not None
            return _PendingObject(self._store, self._key, self._upload_id, list(self._parts))
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        try:
            if self._upload_id is None:
                # Smaller than one part: checked first, then stored in one request.
                self._check()
                with s3_errors(f"storing {self._key}"):
                    self._client().put_object(
                        Bucket=self._store.location.bucket, Key=self._key, Body=bytes(self._buffer)
                    )
                return
        except BaseException:
            self.abort()
            raise
        self.finish().complete()

    def abort(self) -> None:
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._client().abort_multipart_upload(
                    Bucket=self._store.location.bucket, Key=self._key, UploadId=self._upload_id
                )
            self._upload_id = None
        self._buffer.clear()


@dataclass
class _PendingObject:
    """A checked blob whose object does not exist yet: ``complete`` makes it appear."""

    store: S3BlobStore
    key: str
    upload_id: str | None  # None: an empty blob, stored with one PutObject
    parts: list[dict[str, Any]]

    def complete(self) -> None:
        client, bucket = self.store.client, self.store.location.bucket
        with s3_errors(f"storing {self.key}"):
            if self.upload_id is None:
                client.put_object(Bucket=bucket, Key=self.key, Body=b"")
            else:
                client.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": self.parts},  # type: ignore[typeddict-item]
                )

    def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.store.client.abort_multipart_upload(
                    Bucket=self.store.location.bucket, Key=self.key, UploadId=self.upload_id
                )


class _StagedWriter:
    """A blob of a push: checked on ``commit``, kept unfinished until the staging publishes."""

    def __init__(self, staging: _S3Staging, digest: str, size: int) -> None:
        self._staging = staging
        self._digest = digest
        self._writer = _S3Writer(staging.store, staging.store.key(digest), digest, size)

    def write(self, chunk: bytes) -> None:
        self._writer.write(chunk)

    def commit(self) -> None:
        self._staging.hold(self._digest, self._writer.finish())

    def abort(self) -> None:
        self._writer.abort()


class _S3Staging:
    def __init__(self, store: S3BlobStore) -> None:
        self.store = store
        self._pending: dict[str, _PendingObject] = {}

    @property
    def staged(self) -> list[str]:
        return list(self._pending)

    def hold(self, digest: str, pending: _PendingObject) -> None:
        self._pending[digest] = pending

    def has(self, digest: str) -> bool:
        # A held blob whose bytes no longer match is not held: the push's copy replaces it.
        return digest in self._pending or holds_intact(self.store, digest)

    def begin(self, digest: str, size: int) -> BlobWriter:
        check_digest(digest)
        return _StagedWriter(self, digest, size)

    def publish(self) -> None:
        for pending in self._pending.values():
            pending.complete()
        self._pending.clear()

    def discard(self) -> None:
        for pending in self._pending.values():
            pending.abort()
        self._pending.clear()


class S3BlobStore:
    """Blobs as objects in one bucket (see the module docs for the layout)."""

    def __init__(self, location: S3Location, *, client: S3Client | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.location = location
        self.client: S3Client = client or boto3.client(
            "s3",
            endpoint_url=location.endpoint,
            region_name=location.region or "us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                # Presigned GETs (downloads sent by nginx) in SigV4, with a relative expiry:
                # boto3 would otherwise presign in the legacy SigV2 that newer regions refuse.
                signature_version="s3v4",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    @classmethod
    def from_url(cls, url: str) -> S3BlobStore:
        return cls(S3Location.parse(url))

    def key(self, digest: str) -> str:
        return f"{self.location.prefix}sha256/{digest_hex(check_digest(digest))}"

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (the hub's start-up does this)."""
        bucket = self.location.bucket
        with s3_errors(f"checking bucket {bucket}"):
            try:
                self.client.head_bucket(Bucket=bucket)
                return
            except Exception as exc:
                if not is_not_found(exc):
                    raise
            self.client.create_bucket(Bucket=bucket)

    def has(self, digest: str) -> bool:
        if not is_digest(digest):
            return False
        try:
            self.size(digest)
        except NotFound:
            return False
        return True

    def size(self, digest: str) -> int:
        key = self.key(digest)
        with s3_errors(f"looking up {key}"):
            try:
                return int(self.client.head_object(Bucket=self.location.bucket, Key=key)["ContentLength"])
            except Exception as exc:
                if is_not_found(exc):
                    raise NotFound(f"blob {digest} is not held by this hub") from None
                raise

    def open(self, digest: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        key = self.key(digest)
        whole = start == 0 and end is None
        if not whole:
            total = self.size(digest)
            stop = total if end is None else min(end, total)
            if start < 0 or start > stop:
                raise ConfigError(f"byte range {start}-{end} is outside blob {digest} ({total} bytes)")
            if start == stop:
                return io.BytesIO(b"")
        with s3_errors(f"reading {key}"):
            try:
                if whole:
                    answer = self.client.get_object(Bucket=self.location.bucket, Key=key)
                else:
                    answer = self.client.get_object(
                        Bucket=self.location.bucket, Key=key, Range=f"bytes={start}-{stop - 1}"
                    )
            except Exception as exc:
                if is_not_found(exc):
                    raise NotFound(f"blob {digest} is not held by this hub") from None
                raise
        raw = io.BufferedReader(BodyReader(answer["Body"]), buffer_size=1 << 20)
        return io.BufferedReader(VerifiedReader(raw, digest), buffer_size=1 << 20) if whole else raw

    def begin(self, digest: str, size: int) -> BlobWriter:
        return _S3Writer(self, self.key(digest), digest, size)

    def put(
        self, stream: IO[bytes], *, expected_digest: str | None = None, max_bytes: int | None = None
    ) -> tuple[str, int]:
        if expected_digest is not None and holds_intact(self, check_digest(expected_digest)):
            return self._put_again(stream, expected_digest, max_bytes)
        temp = f"{self.location.prefix}uploads/{uuid.uuid4()}"
        key = self.key(expected_digest) if expected_digest else temp
        writer = _S3Writer(self, key, expected_digest, None)
        size = 0
        try:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise TooLarge(
                        f"upload is larger than the hub's limit of {max_bytes} bytes; "
                        "raise EDGEPACK_HUB_MAX_UPLOAD_MB on the hub if this is intended"
                    )
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        try:
            writer.commit()
        except TrustError as exc:
            raise TrustError(
                f"uploaded bytes do not match {expected_digest} ({exc}); "
                "the file changed or was damaged in transit, upload it again"
            ) from None
        assert writer.got is not None
        if expected_digest is None:
            self._move_into_place(key, writer.got)
        return writer.got, size

    def _put_again(self, stream: IO[bytes], digest: str, max_bytes: int | None) -> tuple[str, int]:
        """An upload of a blob already held: checked like any upload, then only touched."""
        hasher, size = hashlib.sha256(), 0
        while chunk := stream.read(1 << 20):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise TooLarge(f"upload is larger than the hub's limit of {max_bytes} bytes")
            hasher.update(chunk)
        if "sha256:" + hasher.hexdigest() != digest:
            raise TrustError(f"uploaded bytes do not match {digest}; upload it again")
        key = self.key(digest)
        with s3_errors(f"refreshing {key}"):
            # Copying an object onto itself with new metadata renews its LastModified, so garbage
            # collection's grace period starts again for a blob that was just uploaded anew.
            self.client.copy_object(
                Bucket=self.location.bucket,
                Key=key,
                CopySource={"Bucket": self.location.bucket, "Key": key},
                MetadataDirective="REPLACE",
                Metadata={"uploaded": datetime.now().astimezone().isoformat()},
            )
        return digest, size

    def _move_into_place(self, temp_key: str, digest: str) -> None:
        bucket = self.location.bucket
        with s3_errors(f"storing {digest}"):
            try:
                self.client.copy({"Bucket": bucket, "Key": temp_key}, bucket, self.key(digest))
            finally:
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=bucket, Key=temp_key)

    def delete(self, digest: str) -> bool:
        if not self.has(digest):
            return False
        with s3_errors(f"deleting {digest}"):
            self.client.delete_object(Bucket=self.location.bucket, Key=self.key(digest))
        return True

    def staging(self) -> BlobStaging:
        return _S3Staging(self)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        prefix = f"{self.location.prefix}sha256/"
        with s3_errors("listing blobs"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    digest = "sha256:" + obj["Key"][len(prefix) :]
                    if is_digest(digest):
                        yield BlobInfo(digest, int(obj["Size"]), obj["LastModified"])

    def clean_partial(self, older_than: datetime) -> int:
        bucket, removed = self.location.bucket, 0
        with s3_errors("cleaning unfinished uploads"):
            uploads = self.client.list_multipart_uploads(Bucket=bucket, Prefix=self.location.prefix)
            for upload in uploads.get("Uploads", []):
                if upload["Initiated"] < older_than:
                    self.client.abort_multipart_upload(
                        Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    removed += 1
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{self.location.prefix}uploads/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["LastModified"] < older_than:
                        self.client.delete_object(Bucket=bucket, Key=obj["Key"])
                        removed += 1
        return removed
