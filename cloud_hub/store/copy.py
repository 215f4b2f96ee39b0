"""Copying every blob of one store into another (moving a hub's blobs to S3).

Each blob is streamed through the target's ``put`` with its digest as the expected one, so
the target checks every byte; blobs the target already holds are skipped, so an interrupted
copy is finished by running it again.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloud_hub.store.blobs import BlobStore


@dataclass(frozen=True)
class Copied:
    copied: int
    skipped: int
    bytes: int


def copy_blobs(source: BlobStore, target: BlobStore) -> Copied:
    copied = skipped = size = 0
    for blob in source.iter_blobs():
        if target.has(blob.digest):
            skipped += 1
            continue
        with source.open(blob.digest) as stream:
            _digest, n = target.put(stream, expected_digest=blob.digest)
        copied += 1
        size += n
    return Copied(copied, skipped, size)
