"""Blob-store faults: S3 going away mid-push, bytes changed behind the store's back, crashes.

Against the real stores: a directory, and SeaweedFS's S3 gateway.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from cloud_hub.store.blobs import BlobStore, FileBlobStore
from cloud_hub.store.s3 import PART_BYTES, S3BlobStore, S3Location
from manifests.digests import sha256_digest
from manifests.errors import FetchError, TrustError
from tests.factory import Forge
from tests.hub.blob_support import leftovers, stored_blobs
from tests.hub.conftest import HubFactory
from tests.hub.seaweedfs_fixtures import SeaweedFS

BUNDLE_TYPE = {"Content-Type": "application/vnd.edgepack.module+tar"}


@pytest.fixture
def s3_store(seaweedfs: SeaweedFS) -> S3BlobStore:
    store = S3BlobStore(S3Location.parse(seaweedfs.url()))
    store.ensure_bucket()
    return store


def test_s3_store_streams_multipart_blobs_and_serves_ranges(s3_store: S3BlobStore) -> None:
    data = os.urandom(2 * PART_BYTES + 12345)  # three parts, the last one short
    digest = sha256_digest(data)
    assert s3_store.put(io.BytesIO(data), expected_digest=digest) == (digest, len(data))
    assert s3_store.size(digest) == len(data)
    with s3_store.open(digest) as fh:
        assert fh.read() == data
    with s3_store.open(digest, PART_BYTES - 3, PART_BYTES + 5) as fh:
        assert fh.read() == data[PART_BYTES - 3 : PART_BYTES + 5]
    small, small_digest = b"tiny", sha256_digest(b"tiny")
    assert s3_store.put(io.BytesIO(small)) == (small_digest, 4)  # digest not known in advance
    assert stored_blobs(s3_store) == {digest, small_digest} and leftovers(s3_store) == []
    assert s3_store.delete(digest) and not s3_store.has(digest) and not s3_store.delete(digest)


def test_s3_upload_with_the_wrong_digest_is_never_visible(s3_store: S3BlobStore) -> None:
    data = os.urandom(PART_BYTES + 10)
    claimed = sha256_digest(b"something else")
    with pytest.raises(TrustError):
        s3_store.put(io.BytesIO(data), expected_digest=claimed)
    assert not s3_store.has(claimed) and stored_blobs(s3_store) == set()
    assert leftovers(s3_store) == []  # the multipart upload was aborted


def test_unfinished_uploads_are_cleaned_after_a_crash(s3_store: S3BlobStore) -> None:
    data = os.urandom(PART_BYTES + 1)
    writer = s3_store.begin(sha256_digest(data), len(data))
    writer.write(data)  # one part sent; then the hub "dies" without commit or abort
    assert leftovers(s3_store) and stored_blobs(s3_store) == set()
    assert s3_store.clean_partial(datetime.now(UTC) - timedelta(hours=1)) == 0  # too young
    assert s3_store.clean_partial(datetime.now(UTC) + timedelta(minutes=1)) == 1
    assert leftovers(s3_store) == []


def _stream_then(data: bytes, cut_at: int, action: threading.Event, done: threading.Event) -> Iterator[bytes]:
    """The body of a push that lets ``action`` happen once ``cut_at`` bytes are sent."""
    yield data[:cut_at]
    action.set()
    assert done.wait(60)
    yield data[cut_at:]


def test_a_push_while_s3_is_unreachable_fails_cleanly_and_a_retry_succeeds(
    hub: HubFactory, forge: Forge, seaweedfs: SeaweedFS
) -> None:
    running = hub(blob_store=seaweedfs.url())
    model = os.urandom(3 * PART_BYTES)
    bundle = forge.bundle(files={"src/score.py": b"def init(): pass\n", "model/w.bin": model})
    cut, stopped = threading.Event(), threading.Event()

    def stop_store() -> None:
        assert cut.wait(60)
        seaweedfs.stop()  # gone in the middle of the upload
        stopped.set()

    stopper = threading.Thread(target=stop_store)
    stopper.start()
    try:
        with running.client(timeout=120) as client:
            body = _stream_then(bundle, PART_BYTES + 4096, cut, stopped)
            refused = client.post("/api/v1/modules", content=body, headers=BUNDLE_TYPE)
    finally:
        stopper.join(60)
        seaweedfs.start()
    assert refused.status_code == 502, refused.text
    error = refused.json()["error"]
    assert error["type"] == "FetchError" and "blob store" in error["message"]
    with running.client() as client:
        assert client.get("/api/v1/modules").json() == []
        assert stored_blobs(running.core.blobs) == set()  # nothing half-visible
        again = client.post("/api/v1/modules", content=bundle, headers=BUNDLE_TYPE)
        assert again.status_code == 201, again.text
        digest = sha256_digest(model)
        served = client.get(f"/api/v1/blobs/{digest}")
        assert served.status_code == 200 and served.content == model


def test_a_store_that_cannot_be_reached_is_a_fetch_error(seaweedfs: SeaweedFS) -> None:
    nowhere = S3BlobStore(S3Location.parse("s3://b?endpoint=http://127.0.0.1:9"))
    with pytest.raises(FetchError, match="unreachable"):
        nowhere.put(io.BytesIO(b"x"), expected_digest=sha256_digest(b"x"))


@pytest.mark.both_blob_stores
def test_a_blob_changed_in_the_store_is_never_served_whole(hub: HubFactory) -> None:
    running = hub()
    data = os.urandom(3 << 20)
    digest = sha256_digest(data)
    with running.client() as client:
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
    forged = bytearray(data)
    forged[-1] ^= 0xFF  # one flipped byte at the very end
    store = running.core.blobs
    if isinstance(store, FileBlobStore):
        Path(store.path(digest)).write_bytes(bytes(forged))
    else:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(Bucket=store.location.bucket, Key=store.key(digest), Body=bytes(forged))
    received = bytearray()
    with (
        running.client() as client,
        pytest.raises(httpx.HTTPError),
        client.stream("GET", f"/api/v1/blobs/{digest}") as answer,
    ):
        assert answer.status_code == 200
        for chunk in answer.iter_bytes():
            received += chunk
    assert len(received) < len(forged) and bytes(received) != bytes(forged)


@pytest.mark.both_blob_stores
def test_a_small_blob_changed_in_the_store_is_not_served(hub: HubFactory) -> None:
    # Blobs up to 1 MiB are answered whole, not streamed: the check must still come first.
    running = hub()
    data = os.urandom(100_000)
    digest = sha256_digest(data)
    with running.client() as client:
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
        assert client.get(f"/api/v1/blobs/{digest}").content == data
    forged = bytes([data[0] ^ 0xFF]) + data[1:]
    store = running.core.blobs
    if isinstance(store, FileBlobStore):
        Path(store.path(digest)).write_bytes(forged)
    else:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(Bucket=store.location.bucket, Key=store.key(digest), Body=forged)
    with running.client() as client:
        answer = client.get(f"/api/v1/blobs/{digest}")
    assert answer.status_code >= 400 and forged not in answer.content


def test_a_single_hubs_blobs_move_to_s3_checked_and_resumably(
    hub: HubFactory, forge: Forge, seaweedfs: SeaweedFS
) -> None:
    import subprocess
    import sys

    old = hub()  # blobs on its disk
    files = {"src/score.py": b"def init(): pass\n", "model/w.bin": os.urandom(PART_BYTES + 5)}
    bundle = forge.bundle(files=files)
    with old.client() as http:
        assert http.post("/api/v1/modules", content=bundle, headers=BUNDLE_TYPE).status_code == 201
    held = stored_blobs(old.core.blobs)
    old.stop()
    target = seaweedfs.url()
    copy = [sys.executable, "-m", "packager", "hub", "copy-blobs",
            "--data-dir", str(old.data_dir), "--to", target]  # fmt: skip
    first = subprocess.run(copy, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    assert f"copied {len(held)} blobs" in first.stdout
    again = subprocess.run(copy, capture_output=True, text=True, timeout=120, check=False)
    assert "copied 0 blobs" in again.stdout and f"{len(held)} were there already" in again.stdout

    moved = old.restart(blob_store=target)  # the same database, blobs in S3
    assert stored_blobs(moved.core.blobs) == held
    with moved.client() as http:
        module = http.get("/api/v1/modules/demo/versions/1").json()
        for f in module["files"]:
            assert sha256_digest(http.get(f"/api/v1/blobs/{f['digest']}").content) == f["digest"]


def _forge_in_store(store: BlobStore, digest: str, forged: bytes) -> None:
    if isinstance(store, FileBlobStore):
        Path(store.path(digest)).write_bytes(forged)
    else:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(Bucket=store.location.bucket, Key=store.key(digest), Body=forged)


@pytest.mark.both_blob_stores
def test_a_resumed_download_of_a_changed_blob_is_refused_not_completed(hub: HubFactory) -> None:
    # A download cut off at 2 MiB resumes with a Range request: the rest of a blob that no
    # longer matches must not be served (a 422 before any byte), or the client pieces together
    # bytes that never were the blob.
    running = hub()
    data = os.urandom(3 << 20)
    digest = sha256_digest(data)
    with running.client() as client:
        assert client.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
        intact = client.get(f"/api/v1/blobs/{digest}", headers={"Range": "bytes=2097152-"})
        assert intact.status_code == 206 and intact.content == data[2 << 20 :]
    _forge_in_store(running.core.blobs, digest, data[:-1] + bytes([data[-1] ^ 0xFF]))
    with running.client() as client:
        answer = client.get(f"/api/v1/blobs/{digest}", headers={"Range": "bytes=2097152-"})
    assert answer.status_code == 422, answer.status_code
    assert digest in answer.json()["error"]["message"]


@pytest.mark.both_blob_stores
def test_pushing_the_intact_module_again_replaces_a_blob_changed_in_the_store(
    hub: HubFactory, forge: Forge
) -> None:
    running = hub()
    model = os.urandom(200_000)
    digest = sha256_digest(model)
    bundle = forge.bundle(files={"src/score.py": b"def init(): pass\n", "model/w.bin": model})
    with running.client() as client:
        assert client.post("/api/v1/modules", content=bundle, headers=BUNDLE_TYPE).status_code == 201
    _forge_in_store(running.core.blobs, digest, bytes([model[0] ^ 0xFF]) + model[1:])
    with running.client() as client:
        assert client.get(f"/api/v1/blobs/{digest}").status_code == 422
        again = client.post("/api/v1/modules", content=bundle, headers=BUNDLE_TYPE)
        assert again.status_code == 200, again.text
        assert again.json()["new_blobs"] == 1, "the damaged blob was written anew"
        assert client.get(f"/api/v1/blobs/{digest}").content == model
    # An upload of the blob alone repairs it the same way.
    _forge_in_store(running.core.blobs, digest, bytes([model[0] ^ 0xFF]) + model[1:])
    with running.client() as client:
        assert client.put(f"/api/v1/blobs/{digest}", content=model).json()["created"] is True
        assert client.get(f"/api/v1/blobs/{digest}").content == model
