"""The content-addressed blob store on a real directory."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cloud_hub.errors import NotFound, TooLarge
from cloud_hub.store.blobs import FileBlobStore
from manifests.digests import sha256_digest
from manifests.errors import TrustError

pytestmark = pytest.mark.sql_independent  # pure logic: no database

DATA = bytes(range(256)) * 5000  # 1.28 MB: more than one read chunk


def stored_files(store: FileBlobStore) -> list[Path]:
    return [p for p in (store.root / "sha256").rglob("*") if p.is_file()]


def leftovers(store: FileBlobStore) -> list[Path]:
    return [p for p in (store.root / "tmp").rglob("*") if p.is_file()]


def test_put_names_the_blob_by_its_digest_and_reads_it_back(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    digest, size = store.put(io.BytesIO(DATA))
    assert (digest, size) == (sha256_digest(DATA), len(DATA))
    assert store.has(digest) and store.size(digest) == len(DATA)
    with store.open(digest) as fh:
        assert fh.read() == DATA


def test_the_same_bytes_are_held_once(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    first = store.put(io.BytesIO(DATA))
    second = store.put(io.BytesIO(DATA), expected_digest=first[0])
    assert first == second
    assert len(stored_files(store)) == 1
    assert leftovers(store) == []


@pytest.mark.parametrize(
    ("start", "end"), [(0, 10), (5, 5), (1000, 300_000), (len(DATA) - 7, None), (100, len(DATA) + 50)]
)
def test_byte_ranges(tmp_path: Path, start: int, end: int | None) -> None:
    store = FileBlobStore(tmp_path)
    digest, _ = store.put(io.BytesIO(DATA))
    with store.open(digest, start, end) as fh:
        assert fh.read() == DATA[start:end]


def test_a_digest_mismatch_stores_nothing(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    with pytest.raises(TrustError, match="not sha256:"):
        store.put(io.BytesIO(b"evil"), expected_digest=sha256_digest(b"good"))
    assert stored_files(store) == [] and leftovers(store) == []


def test_too_large_stores_nothing(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    with pytest.raises(TooLarge, match="limit of 1000 bytes"):
        store.put(io.BytesIO(DATA), max_bytes=1000)
    assert stored_files(store) == [] and leftovers(store) == []


def test_missing_blobs_are_not_found_and_delete_reports_what_it_did(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    digest, _ = store.put(io.BytesIO(b"x"))
    assert store.delete(digest) is True
    assert store.delete(digest) is False
    assert not store.has(digest)
    with pytest.raises(NotFound):
        store.open(digest)
    with pytest.raises(NotFound):
        store.size(digest)


def test_a_sink_writer_keeps_the_blob_only_when_its_digest_matches(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    good = store.begin(sha256_digest(b"hello"), 5)
    good.write(b"hello")
    good.commit()
    bad = store.begin(sha256_digest(b"hello!"), 6)
    bad.write(b"HELLO!")
    with pytest.raises(TrustError):
        bad.commit()
    assert store.has(sha256_digest(b"hello")) and not store.has(sha256_digest(b"hello!"))
    assert leftovers(store) == []


def test_staged_blobs_appear_only_when_published(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    staging = store.staging()
    writer = staging.begin(sha256_digest(b"one"), 3)
    writer.write(b"one")
    writer.commit()
    assert staging.has(sha256_digest(b"one")) and not store.has(sha256_digest(b"one"))
    staging.publish()
    assert store.has(sha256_digest(b"one"))

    dropped = store.staging()
    writer = dropped.begin(sha256_digest(b"two"), 3)
    writer.write(b"two")
    writer.commit()
    dropped.discard()
    assert not store.has(sha256_digest(b"two"))
    assert leftovers(store) == []
