"""Verifying ``.edgepack`` bundles: every defect an attacker or a bad disk produces is refused."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from manifests.bundle import BundleLimits, verify_bundle
from manifests.digests import sha256_digest
from manifests.errors import TrustError
from manifests.signing import TrustStore
from manifests.tar_stream import TarReader
from packager.inspect import open_verified
from tests.conftest import Publisher
from tests.factory import Defect, Forge, default_files, tar_bytes


@dataclass
class MemorySink:
    """A real BlobSink that keeps committed blobs in memory and records what it was asked."""

    held: dict[str, bytes] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    begun: list[str] = field(default_factory=list)

    def has(self, digest: str) -> bool:
        return digest in self.held

    def begin(self, digest: str, size: int) -> MemoryWriter:
        self.begun.append(digest)
        return MemoryWriter(self, digest)


@dataclass
class MemoryWriter:
    sink: MemorySink
    digest: str
    buf: bytearray = field(default_factory=bytearray)

    def write(self, chunk: bytes) -> None:
        self.buf += chunk

    def commit(self) -> None:
        self.sink.held[self.digest] = bytes(self.buf)

    def abort(self) -> None:
        self.sink.aborted.append(self.digest)


@pytest.fixture(scope="module")
def forge() -> Forge:
    return Forge()


def test_a_sound_bundle_verifies_and_its_blobs_reach_the_sink(forge: Forge) -> None:
    sink = MemorySink()
    seen: list[int] = []
    verified = verify_bundle(io.BytesIO(forge.bundle()), forge.trust, sink=sink, progress=seen.append)
    files = default_files()
    assert verified.manifest.ref == "demo:1"
    assert sink.held == {sha256_digest(data): data for data in files.values()}
    assert sum(seen) == sum(len(d) for d in files.values())
    assert verified.signers == [k.keyid for k in forge.trust.keys]
    assert verified.manifest_digest == sha256_digest(verified.manifest_bytes)


@pytest.mark.parametrize("defect", list(Defect), ids=str)
def test_verify_refuses_every_defect_naming_the_reason(forge: Forge, defect: Defect) -> None:
    with pytest.raises(TrustError) as err:
        verify_bundle(io.BytesIO(forge.bundle(defect)), forge.trust, what="digits-1.edgepack")
    message = str(err.value)
    assert defect.reason in message
    assert message.startswith("digits-1.edgepack")
    assert "\n" not in message


def test_a_blob_whose_digest_fails_is_never_committed(forge: Forge) -> None:
    sink = MemorySink()
    with pytest.raises(TrustError):
        verify_bundle(io.BytesIO(forge.bundle(Defect.TAMPERED_BYTE)), forge.trust, sink=sink)
    assert sink.aborted, "the writer of the damaged blob must be aborted"
    assert set(sink.aborted).isdisjoint(sink.held)


def test_blobs_already_held_are_not_written_again(forge: Forge) -> None:
    sink = MemorySink()
    verify_bundle(io.BytesIO(forge.bundle()), forge.trust, sink=sink)
    first = list(sink.begun)
    changed = {**default_files(), "model/model.json": b'{"factor":3}'}
    verify_bundle(io.BytesIO(forge.bundle(files=changed, version="2")), forge.trust, sink=sink)
    # Only the new model blob is fetched; the unchanged score.py is reused.
    assert sink.begun[len(first) :] == [sha256_digest(b'{"factor":3}')]


def test_a_module_over_the_size_limit_is_refused_before_any_blob_is_read(forge: Forge) -> None:
    sink = MemorySink()
    with pytest.raises(TrustError, match="larger than allowed"):
        verify_bundle(
            io.BytesIO(forge.bundle()),
            forge.trust,
            sink=sink,
            limits=BundleLimits(max_total_bytes=10),
        )
    assert sink.begun == []


def test_too_many_files_and_a_huge_manifest_are_refused(forge: Forge) -> None:
    with pytest.raises(TrustError, match="more files than allowed"):
        verify_bundle(io.BytesIO(forge.bundle()), forge.trust, limits=BundleLimits(max_files=1))
    with pytest.raises(TrustError, match=r"module\.json is larger than allowed"):
        verify_bundle(
            io.BytesIO(forge.bundle()), forge.trust, limits=BundleLimits(max_manifest_bytes=64)
        )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a module bundle"),
        (tar_bytes([]), "empty archive"),
        (b"this is not a tar file" * 40, "not a module bundle"),
    ],
)
def test_not_a_bundle_at_all(forge: Forge, data: bytes, reason: str) -> None:
    with pytest.raises(TrustError, match=reason):
        verify_bundle(io.BytesIO(data), forge.trust)


def test_a_truncated_bundle_is_refused(forge: Forge) -> None:
    data = forge.bundle(files={"src/score.py": b"x" * 5000, "model/m.bin": b"y" * 5000})
    with pytest.raises(TrustError):
        verify_bundle(io.BytesIO(data[:3000]), forge.trust)


# --- the same, on a bundle the real builder wrote ------------------------------------------


def blob_offset(bundle: bytes, digest: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as tar:
        return tar.getmember("blobs/sha256/" + digest.split(":")[1]).offset_data


def test_real_bundle_verifies_from_disk(digits_bundle: Path, publisher: Publisher) -> None:
    verified = open_verified(digits_bundle, publisher.trust)
    assert verified.manifest.ref == "digits:1"
    assert [f.path for f in verified.manifest.files] == ["model/digits.onnx", "src/score.py"]


def test_one_changed_byte_in_a_real_model_is_refused(
    digits_bundle: Path, publisher: Publisher, tmp_path: Path
) -> None:
    data = bytearray(digits_bundle.read_bytes())
    verified = open_verified(digits_bundle, publisher.trust)
    model = next(f for f in verified.manifest.files if f.path == "model/digits.onnx")
    at = blob_offset(bytes(data), model.digest) + model.size // 2
    data[at] ^= 0xFF
    damaged = tmp_path / "digits-1.edgepack"
    damaged.write_bytes(data)
    with pytest.raises(TrustError, match=f"{model.digest} does not match its digest"):
        open_verified(damaged, publisher.trust)


def test_one_changed_byte_in_a_real_manifest_is_refused(
    digits_bundle: Path, publisher: Publisher, tmp_path: Path
) -> None:
    data = digits_bundle.read_bytes()
    at = data.index(b'"name":"digits"') + len('"name":"digit')
    damaged = tmp_path / "digits-1.edgepack"
    damaged.write_bytes(data[:at] + b"z" + data[at + 1 :])
    with pytest.raises(TrustError, match="does not match the content"):
        open_verified(damaged, publisher.trust)


def test_real_bundle_signed_by_someone_else_is_refused(digits_bundle: Path) -> None:
    stranger = Forge().trust
    with pytest.raises(TrustError, match="untrusted key"):
        open_verified(digits_bundle, stranger)
    with pytest.raises(TrustError, match="no trusted keys"):
        open_verified(digits_bundle, TrustStore())


def test_forge_module_parts_match_its_bundle(forge: Forge) -> None:
    """Hub and agent tests serve ``module()`` parts and push ``bundle()`` bytes: the same
    arguments must describe the same signed module."""
    parts = forge.module(name="same", version="3")
    sink = MemorySink()
    verified = verify_bundle(io.BytesIO(forge.bundle(name="same", version="3")), forge.trust, sink=sink)
    assert verified.manifest_bytes == parts.manifest_bytes
    assert verified.manifest_digest == parts.manifest_digest
    assert sink.held == parts.blobs


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_tar_reader_reads_what_tarfile_writes(fmt: int) -> None:
    # Bundles are read by manifests.tar_stream, not tarfile: it must agree with tarfile on
    # names (long ones, with a prefix, non-ASCII), sizes, types and contents.
    names = ["module.json", "d/" + "n" * 90 + "/" + "m" * 60, "caf\u00e9.bin", "x" * 99]
    if fmt == tarfile.USTAR_FORMAT:
        names = [n for n in names if n.isascii()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for n, name in enumerate(names):
            data = bytes([n]) * (n * 700)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "module.json"
        tar.addfile(link)
    buf.seek(0)
    reader = TarReader(buf)
    seen = []
    for member in reader.members():
        data = b"".join(reader.read_member())
        seen.append((member.name, member.size, member.isreg(), member.issym(), data))
    expected = [(name, n * 700, True, False, bytes([n]) * (n * 700)) for n, name in enumerate(names)]
    assert seen == [*expected, ("link", 0, False, True, b"")]
