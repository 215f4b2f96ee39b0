"""Where batches of collected data are kept: named objects, Azure's layout, one per batch.

The blob store is content-addressed (``sha256/<hex>``) and its garbage collection removes
every blob no module or model names, so batches live beside it, not in it: under
``<data_dir>/data/`` on a single hub, under ``<prefix>data/`` in the S3 bucket of a
scaled-out hub (every replica sees the same objects), or in ``FOLDER/data/`` of a file store
the replicas share (``--blob-store file:///FOLDER``). The key is
:func:`manifests.data.blob_key`: ``service/model/version/designation/YYYY/MM/DD/DEVICE-HEX.jsonl.gz``.

A batch is written whole or not at all (:func:`manifests.durable.durable_output`; one
``PutObject``),
and read back through its digest check.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import IO, Protocol

from cloud_hub.errors import NotFound
from cloud_hub.store.blobs import BlobStore, FileBlobStore, VerifiedReader
from cloud_hub.store.s3 import BodyReader, S3BlobStore, is_not_found, s3_errors
from manifests.durable import durable_output
from manifests.errors import ConfigError

CHUNK = 1 << 20


class DataStore(Protocol):
    def put(self, key: str, fh: IO[bytes], size: int) -> None:
        """Store ``size`` bytes of ``fh`` (already checked) as ``key``, replacing any object there."""

    def open(self, key: str, digest: str) -> IO[bytes]:
        """The object's bytes, read through a check against ``digest``; NotFound if absent."""

    def delete(self, key: str) -> None:
        """Remove the object (absent is fine)."""


def _check_key(key: str) -> str:
    # Keys are built from validated names, but a key never leaves its folder whatever it is.
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"data key {key[:200]!r} is not a relative path")
    return key


class FileDataStore:
    """Batches as files under one folder (a single hub), written by the one durable write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, fh: IO[bytes], size: int) -> None:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with durable_output(final, mode=0o600) as out:
            while chunk := fh.read(CHUNK):
                out.write(chunk)

    def open(self, key: str, digest: str) -> IO[bytes]:
        try:
            fh = self.path(key).open("rb")
        except FileNotFoundError:
            raise NotFound(f"data batch {key} is not in the store") from None
        return io.BufferedReader(VerifiedReader(fh, digest), buffer_size=CHUNK)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()


class S3DataStore:
    """Batches as objects under ``<prefix>data/`` in the blob store's bucket (scaled out)."""

    def __init__(self, blobs: S3BlobStore) -> None:
        self._blobs = blobs
        self._bucket = blobs.location.bucket
        self._prefix = f"{blobs.location.prefix}data/"

    def key(self, key: str) -> str:
        return self._prefix + _check_key(key)

    def put(self, key: str, fh: IO[bytes], size: int) -> None:
        # A batch is at most MAX_BATCH_BYTES (8 MiB): one PutObject, which S3 makes visible
        # whole or not at all.
        with s3_errors(f"storing data batch {key}"):
            self._blobs.client.put_object(Bucket=self._bucket, Key=self.key(key), Body=fh, ContentLength=size)

    def open(self, key: str, digest: str) -> IO[bytes]:
        with s3_errors(f"reading data batch {key}"):
            try:
                answer = self._blobs.client.get_object(Bucket=self._bucket, Key=self.key(key))
            except Exception as exc:
                if is_not_found(exc):
                    raise NotFound(f"data batch {key} is not in the store") from None
                raise
        raw = io.BufferedReader(BodyReader(answer["Body"]), buffer_size=CHUNK)
        return io.BufferedReader(VerifiedReader(raw, digest), buffer_size=CHUNK)

    def delete(self, key: str) -> None:
        with s3_errors(f"deleting data batch {key}"):
            self._blobs.client.delete_object(Bucket=self._bucket, Key=self.key(key))


def open_data_store(blobs: BlobStore, data_dir: Path) -> DataStore:
    """The data store beside the hub's blob store: files for a file store, the bucket for S3."""
    if isinstance(blobs, S3BlobStore):
        return S3DataStore(blobs)
    if not isinstance(blobs, FileBlobStore):
        raise ConfigError(f"no data store for a blob store of type {type(blobs).__name__}")
    if blobs.root.resolve() == (data_dir / "blobs").resolve():
        return FileDataStore(data_dir / "data")
    # A shared folder: the batches go where every replica sees them, as in the bucket.
    return FileDataStore(blobs.root / "data")
