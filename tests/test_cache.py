"""The device's module cache, against real files: blobs land only when their digest matches,
module folders appear whole or not at all, and nothing is stored twice."""

from __future__ import annotations

import fcntl
import io
import os
import stat
import threading
from pathlib import Path

import pytest

from edge_agent.cache import ModuleCache, plan_layout
from manifests.bundle import verify_bundle
from manifests.digests import digest_hex, sha256_digest
from manifests.errors import CacheError, FetchError, TrustError
from manifests.verified import VerifiedModule, parse_module_manifest
from tests.conftest import Publisher
from tests.factory import Defect, Forge


def all_files(root: Path) -> set[str]:
    return {
        str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root) for f in files
    }


def write_bundle_file(tmp_path: Path, data: bytes, name: str = "m.edgepack") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_install_lays_out_the_module_read_only_and_linked_to_its_blobs(
    tmp_path: Path, digits_bundle: Path, publisher: Publisher
) -> None:
    cache = ModuleCache(tmp_path / "cache")
    installed = cache.install_bundle(digits_bundle, publisher.trust)

    assert installed.dir == tmp_path / "cache" / "modules" / digest_hex(installed.manifest_digest)
    manifest_bytes = (installed.dir / "module.json").read_bytes()
    assert sha256_digest(manifest_bytes) == installed.manifest_digest
    assert {"module.json", "src/score.py", "model/digits.onnx"} <= all_files(installed.dir)
    for f in installed.manifest.files:
        placed = installed.dir / f.path
        assert placed.stat().st_size == f.size
        assert not placed.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        assert placed.samefile(cache.blob_path(f.digest))  # a hard link, not a second copy
        assert cache.has(f.digest)
    for folder in (installed.dir, installed.dir / "src", installed.dir / "model"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o555


def test_second_install_is_a_no_op(
    tmp_path: Path, digits_bundle: Path, publisher: Publisher
) -> None:
    cache = ModuleCache(tmp_path / "cache")
    first = cache.install_bundle(digits_bundle, publisher.trust)
    before = {p: os.lstat(tmp_path / "cache" / p).st_ino for p in all_files(tmp_path / "cache")}

    second = cache.install_bundle(digits_bundle, publisher.trust)

    assert second.dir == first.dir
    after = {p: os.lstat(tmp_path / "cache" / p).st_ino for p in all_files(tmp_path / "cache")}
    assert after == before  # nothing rewritten, nothing added


def test_modules_share_blobs_they_have_in_common(tmp_path: Path) -> None:
    forge = Forge()
    same = b"shared weights" * 1000
    v1 = forge.bundle(version="1", files={"src/score.py": b"# v1", "model/w.bin": same,
                                          "model/copy.bin": same})
    v2 = forge.bundle(version="2", files={"src/score.py": b"# v2", "model/w.bin": same})
    cache = ModuleCache(tmp_path / "cache")

    one = cache.install_bundle(write_bundle_file(tmp_path, v1, "v1.edgepack"), forge.trust)
    two = cache.install_bundle(write_bundle_file(tmp_path, v2, "v2.edgepack"), forge.trust)

    assert one.dir != two.dir
    held = sorted(cache.blobs.digests())
    assert held == sorted({sha256_digest(b) for b in (b"# v1", b"# v2", same)})
    assert (one.dir / "model/copy.bin").samefile(two.dir / "model/w.bin")


@pytest.mark.parametrize("defect", [Defect.TAMPERED_BYTE, Defect.OVERSIZE])
def test_a_tampered_blob_never_lands_in_the_cache(tmp_path: Path, defect: Defect) -> None:
    forge = Forge()
    cache = ModuleCache(tmp_path / "cache")
    bundle = write_bundle_file(tmp_path, forge.bundle(defect))

    with pytest.raises(TrustError, match=defect.reason):
        cache.install_bundle(bundle, forge.trust)

    victim = min(forge.module().blobs)  # the forge damages the first blob by digest
    assert not cache.has(victim)
    files = all_files(tmp_path / "cache") if (tmp_path / "cache").exists() else set()
    assert not any(f.endswith(".part") or f.startswith("modules") for f in files)


def test_untrusted_bundle_writes_nothing(tmp_path: Path) -> None:
    forge = Forge()
    cache = ModuleCache(tmp_path / "cache")
    bundle = write_bundle_file(tmp_path, forge.bundle(Defect.UNTRUSTED_KEY))

    with pytest.raises(TrustError, match=Defect.UNTRUSTED_KEY.reason):
        cache.install_bundle(bundle, forge.trust)

    assert not (tmp_path / "cache").exists() or all_files(tmp_path / "cache") == set()


def test_blobs_downloaded_one_by_one_are_checked_before_they_count(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    data = os.urandom(3 << 20)
    digest = sha256_digest(data)

    wrong = cache.begin(digest, len(data))
    wrong.write(data[:-1] + b"\0")
    with pytest.raises(TrustError, match="does not match its digest"):
        wrong.commit()
    short = cache.begin(digest, len(data))
    short.write(data[:100])
    with pytest.raises(TrustError, match="expected"):
        short.commit()
    long = cache.begin(digest, 10)
    with pytest.raises(TrustError, match="more than"):
        long.write(data[:11])
    aborted = cache.begin(digest, len(data))
    aborted.write(data[:5])
    aborted.abort()
    assert not cache.has(digest)
    assert os.listdir(cache.blobs.dir) == []

    good = cache.begin(digest, len(data))
    for i in range(0, len(data), 1 << 20):
        good.write(data[i : i + (1 << 20)])
    good.commit()
    assert cache.has(digest)
    assert cache.blob_path(digest).read_bytes() == data
    assert os.listdir(cache.blobs.dir) == [digest_hex(digest)]


def test_a_download_written_in_a_with_block_lands_only_when_whole(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    data = b"model bytes " * 10_000
    digest = sha256_digest(data)

    with pytest.raises(ConnectionResetError), cache.begin(digest, len(data)) as blob:
        blob.write(data[:1000])
        raise ConnectionResetError("the hub went away mid-download")
    assert not cache.has(digest) and os.listdir(cache.blobs.dir) == []

    with cache.begin(digest, len(data)) as blob:
        blob.write(data)
    assert cache.has(digest)


def test_a_symlink_planted_under_a_blob_name_is_not_a_blob(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    digest = sha256_digest(b"secret")
    (tmp_path / "secret").write_bytes(b"secret")
    cache.blobs.dir.mkdir(parents=True)
    cache.blob_path(digest).symlink_to(tmp_path / "secret")
    assert not cache.has(digest)


def verified_parts(forge: Forge, **kwargs: object) -> tuple[VerifiedModule, dict[str, bytes]]:
    parts = forge.module(**kwargs)  # type: ignore[arg-type]
    return parse_module_manifest(parts.manifest_bytes, forge.trust, what="test"), parts.blobs


def put_blobs(cache: ModuleCache, blobs: dict[str, bytes]) -> None:
    for digest, data in blobs.items():
        w = cache.begin(digest, len(data))
        w.write(data)
        w.commit()


def test_materialize_needs_every_blob_and_builds_nothing_without_them(tmp_path: Path) -> None:
    forge = Forge()
    verified, blobs = verified_parts(forge)
    cache = ModuleCache(tmp_path / "cache")
    first = sorted(blobs)[0]
    put_blobs(cache, {first: blobs[first]})

    with pytest.raises(FetchError, match="download it first"):
        cache.materialize(verified)
    assert cache.installed() == []

    put_blobs(cache, blobs)
    folder = cache.materialize(verified)
    assert cache.installed() == [verified.manifest_digest]
    assert (folder / "model/model.json").read_bytes() == blobs[sha256_digest(
        (folder / "model/model.json").read_bytes())]
    assert os.listdir(cache.modules) == [folder.name]  # no temp folder left


def test_a_damaged_module_folder_is_rebuilt(tmp_path: Path) -> None:
    forge = Forge()
    verified, blobs = verified_parts(forge)
    cache = ModuleCache(tmp_path / "cache")
    put_blobs(cache, blobs)
    folder = cache.materialize(verified)
    (folder / "src/score.py").unlink()

    assert cache.open_installed(verified.manifest_digest, forge.trust) is None
    again = cache.materialize(verified)

    assert again == folder
    assert (folder / "src/score.py").is_file()
    reopened = cache.open_installed(verified.manifest_digest, forge.trust)
    assert reopened is not None and reopened.manifest.ref == "demo:1"


def test_materialize_rechecks_paths_the_manifest_should_have_refused(tmp_path: Path) -> None:
    forge = Forge()
    verified, blobs = verified_parts(forge)
    cache = ModuleCache(tmp_path / "cache")
    put_blobs(cache, blobs)
    evil_entry = verified.manifest.files[0].model_copy(update={"path": "model/../../../escape"})
    evil = verified.manifest.model_copy(update={"files": [evil_entry]})
    bad = VerifiedModule(
        manifest=evil,
        envelope=verified.envelope,
        manifest_bytes=verified.manifest_bytes,
        manifest_digest=verified.manifest_digest,
        signers=verified.signers,
    )

    with pytest.raises(TrustError, match="unsafe path"):
        plan_layout(evil)
    with pytest.raises(TrustError, match="unsafe path"):
        cache.materialize(bad)
    assert not (tmp_path / "escape").exists()
    assert cache.installed() == []


def test_a_file_and_a_folder_of_the_same_name_are_refused() -> None:
    forge = Forge()
    manifest = forge.manifest()
    clash = manifest.files[0].model_copy(update={"path": "model/model.json/inner"})
    bad = manifest.model_copy(update={"files": [*manifest.files, clash]})
    with pytest.raises(TrustError, match="clashes"):
        plan_layout(bad)


def test_prune_keeps_what_kept_modules_use_and_nothing_else(tmp_path: Path) -> None:
    forge = Forge()
    cache = ModuleCache(tmp_path / "cache")
    old = cache.install_bundle(
        write_bundle_file(tmp_path, forge.bundle(version="1", files={
            "src/score.py": b"# same", "model/w.bin": b"old weights"}), "v1.edgepack"),
        forge.trust,
    )
    new = cache.install_bundle(
        write_bundle_file(tmp_path, forge.bundle(version="2", files={
            "src/score.py": b"# same", "model/w.bin": b"new weights"}), "v2.edgepack"),
        forge.trust,
    )
    pending = sha256_digest(b"half of a download")
    put_blobs(cache, {pending: b"half of a download"})

    report = cache.prune({new.manifest_digest}, keep_blobs=frozenset({pending}))

    assert (report.modules_removed, report.blobs_removed) == (1, 1)
    assert report.bytes_freed == len(b"old weights")
    assert not old.dir.exists()
    assert cache.installed() == [new.manifest_digest]
    assert set(cache.blobs.digests()) == {
        sha256_digest(b"# same"), sha256_digest(b"new weights"), pending
    }
    assert (new.dir / "model/w.bin").read_bytes() == b"new weights"


def test_verify_bundle_streams_into_the_cache_as_a_sink(tmp_path: Path) -> None:
    forge = Forge()
    cache = ModuleCache(tmp_path / "cache")
    verified = verify_bundle(io.BytesIO(forge.bundle()), forge.trust, sink=cache)
    assert all(cache.has(f.digest) for f in verified.manifest.files)


# --- one writer per blob --------------------------------------------------------------------


def test_a_second_fetch_of_a_blob_waits_for_the_first_and_finds_it_held(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    data = os.urandom(1 << 20)
    digest = sha256_digest(data)
    first = cache.blobs.begin_resumable(digest, len(data))
    assert first is not None
    first.write(data[: len(data) // 2])
    waited = threading.Event()
    second: list[object] = []

    def fetch_again() -> None:
        second.append(cache.blobs.begin_resumable(digest, len(data), check=waited.set))

    twin = threading.Thread(target=fetch_again)
    twin.start()
    assert waited.wait(10), "the second writer waits while the first writes"
    first.write(data[len(data) // 2 :])
    first.commit()
    twin.join(10)
    assert second == [None], "nothing left to do: the blob is held"
    assert cache.blob_path(digest).read_bytes() == data
    assert os.listdir(cache.blobs.dir) == [digest_hex(digest)], "no partial file left behind"


def test_a_blob_another_process_is_writing_is_not_written_beside_it(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    data = os.urandom(4096)
    digest = sha256_digest(data)
    partial = cache.blobs.partial_path(digest)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:100])
    # What another agent process writing the blob holds: the partial file's exclusive lock.
    with partial.open("rb") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        checks = 0

        def give_up_after_three() -> None:
            nonlocal checks
            checks += 1
            if checks == 3:
                raise FetchError("deadline")

        with pytest.raises(FetchError, match="deadline"):
            cache.blobs.begin_resumable(digest, len(data), check=give_up_after_three)
    assert partial.read_bytes() == data[:100], "not a byte appended while it was locked"
    writer = cache.blobs.begin_resumable(digest, len(data))
    assert writer is not None and writer.offset == 100
    writer.write(data[100:])
    writer.commit()
    assert cache.blob_path(digest).read_bytes() == data


def test_a_file_of_the_wrong_size_under_a_blobs_name_is_not_trusted(tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    data = b"sixteen bytes!!!"
    digest = sha256_digest(data)
    final = cache.blob_path(digest)
    final.parent.mkdir(parents=True)
    final.write_bytes(data + data)  # what two interleaved downloads left
    assert not cache.blobs.held(digest, len(data)) and not final.exists()
    writer = cache.blobs.begin_resumable(digest, len(data))
    assert writer is not None
    writer.write(data)
    writer.commit()
    assert cache.blobs.held(digest, len(data)) and final.read_bytes() == data


def test_a_cache_that_cannot_be_written_is_a_temporary_cache_error(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "blobs").write_bytes(b"a file where a folder must be")
    cache = ModuleCache(tmp_path / "cache")
    with pytest.raises(CacheError, match="blob sha256:") as failed:
        cache.blobs.begin_resumable(sha256_digest(b"x"), 1)
    assert failed.value.temporary
