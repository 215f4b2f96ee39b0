"""Looking into a hub's blob store from a test, whichever store it is (files or S3)."""

from __future__ import annotations

import os
from pathlib import Path

from cloud_hub.store.blobs import BlobStore, FileBlobStore
from cloud_hub.store.s3 import S3BlobStore


def stored_blobs(store: BlobStore) -> set[str]:
    """Every visible blob."""
    return {b.digest for b in store.iter_blobs()}


def leftovers(store: BlobStore) -> list[str]:
    """What unfinished writes left behind: temp files, open multipart uploads, ``uploads/``."""
    if isinstance(store, FileBlobStore):
        # os.walk, not rglob: the hub removes a cut-off upload's staging folder while this
        # looks, and a folder that vanishes between listing and reading is simply not there.
        walk = os.walk(store.root / "tmp")
        return [os.path.join(folder, name) for folder, _, names in walk for name in names]
    assert isinstance(store, S3BlobStore)
    bucket, prefix = store.location.bucket, store.location.prefix
    uploads = store.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    temp = store.client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}uploads/").get("Contents", [])
    return [u["Key"] for u in uploads] + [o["Key"] for o in temp]


def leave_a_crashed_upload(store: BlobStore) -> None:
    """What a hub killed in the middle of an upload leaves in the store."""
    if isinstance(store, FileBlobStore):
        Path(store.root / "tmp" / "put-crashed.part").write_bytes(b"half an upload")
        return
    assert isinstance(store, S3BlobStore)
    key = f"{store.location.prefix}sha256/{'0' * 64}"
    upload = store.client.create_multipart_upload(Bucket=store.location.bucket, Key=key)
    store.client.upload_part(
        Bucket=store.location.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"half"
    )
