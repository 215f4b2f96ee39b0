"""Adversarial review: hostile input to the contracts, the packager and the scoring server.

Each test here failed before the fix it names; together they pin down what an attacker (or a
careless user) must not get through.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
import threading
import tracemalloc
from pathlib import Path

import httpx
import pytest

from manifests.bundle import BLOB_PREFIX, MANIFEST_NAME, verify_bundle
from manifests.digests import digest_hex, is_digest, sha256_digest
from manifests.errors import ConfigError, TrustError
from manifests.signing import generate_private_key, private_key_pem
from packager.build import BuildSpec, build_module
from tests.conftest import Publisher
from tests.factory import Forge, Member, default_files, tar_bytes
from tests.test_scoring_server import make_module, serving, wait_ready


def test_a_digest_with_a_trailing_newline_is_not_a_digest() -> None:
    # Python's '$' also matches before a final newline; identifiers must match in full.
    good = sha256_digest(b"x")
    assert is_digest(good)
    assert not is_digest(good + "\n")


def test_a_blob_member_whose_name_ends_in_a_newline_is_refused() -> None:
    forge = Forge()
    files = default_files()
    members = [Member(MANIFEST_NAME, forge.module(files=files).manifest_bytes)]
    for digest, data in sorted({sha256_digest(d): d for d in files.values()}.items()):
        members.append(Member(BLOB_PREFIX + digest_hex(digest) + "\n", data))
    with pytest.raises(TrustError, match="unexpected member"):
        verify_bundle(io.BytesIO(tar_bytes(members)), forge.trust)


def _source_with_model(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    (src / "model").mkdir(parents=True)
    (src / "score.py").write_text("def init():\n    pass\n\n\ndef run(raw):\n    return raw\n")
    (src / "model" / "weights.bin").write_bytes(b"\0" * 64)
    return src, src / "model"


def _spec(src: Path, model: Path) -> BuildSpec:
    return BuildSpec(name="leaky", version="1", entry_script=src / "score.py", model=model, source_dir=src)


@pytest.mark.parametrize("where", ["src", "model"])
def test_a_private_key_in_the_source_or_model_folder_is_never_packed(
    tmp_path: Path, publisher: Publisher, where: str
) -> None:
    # Only '*.key' files were left out; the same key saved as 'deploy.pem' shipped to devices.
    src, model = _source_with_model(tmp_path)
    folder = src if where == "src" else model
    (folder / "deploy.pem").write_bytes(private_key_pem(generate_private_key()))
    out = tmp_path / "dist"
    with pytest.raises(ConfigError, match="private key"):
        build_module(_spec(src, model), publisher.key, out)
    assert not out.exists() or not any(out.iterdir())


def test_a_named_pipe_in_the_source_folder_fails_the_build_instead_of_hanging_it(
    tmp_path: Path, publisher: Publisher
) -> None:
    src, model = _source_with_model(tmp_path)
    os.mkfifo(src / "pipe")
    outcome: list[BaseException | None] = []

    def build() -> None:
        try:
            build_module(_spec(src, model), publisher.key, tmp_path / "dist")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():
        # Unblock the build (it is stuck opening the FIFO) so the thread can end.
        with open(src / "pipe", "wb"):
            pass
        worker.join(timeout=10)
        pytest.fail("the build blocked on a named pipe in the source folder")
    assert isinstance(outcome[0], ConfigError), outcome
    assert "not a regular file" in str(outcome[0])


# --- the scoring server ------------------------------------------------------------------------

RECORDING_SCRIPT = """
import json, os

def init():
    pass

def run(raw_data):
    with open(os.environ["CALLS_LOG"], "a") as fh:
        fh.write(json.dumps(raw_data) + "\\n")
    return json.loads(raw_data)
"""


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=15)


def test_the_scoring_server_never_runs_a_body_cut_off_by_a_disconnect(tmp_path: Path) -> None:
    # A client that went away mid-body used to have run() called on what had arrived so far.
    module = make_module(tmp_path / "rec", RECORDING_SCRIPT, {"m.bin": b"x"})
    calls = tmp_path / "calls.log"
    with serving(module, env={"CALLS_LOG": str(calls)}) as server:
        wait_ready(server)
        for head in (
            b"POST /score HTTP/1.1\r\nHost: s\r\nContent-Length: 100\r\n\r\n",
            b"POST /score HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n",
        ):
            with _connect(server.url) as sock:
                sock.sendall(head + b'{"cut": "off"')
        # Requests after the disconnects: by the time they are answered the server has long
        # seen both connections close.
        for n in range(20):
            assert httpx.post(server.url + "/score", json={"n": n}).status_code == 200
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    assert not [s for s in seen if "cut" in s], seen
    assert len(seen) == 20


def test_the_scoring_server_refuses_an_announced_oversized_body_before_reading_it(tmp_path: Path) -> None:
    module = make_module(tmp_path / "rec", RECORDING_SCRIPT, {"m.bin": b"x"})
    calls = tmp_path / "calls.log"
    with serving(module, env={"CALLS_LOG": str(calls), "EDGEPACK_MAX_BODY_BYTES": "4096"}) as server:
        wait_ready(server)
        with _connect(server.url) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: s\r\nContent-Length: 1000000000\r\n\r\n{")
            answer = b""
            try:
                while b"PayloadTooLarge" not in answer and (chunk := sock.recv(4096)):
                    answer += chunk
            except TimeoutError:
                answer += b"(no answer: the server waited for the announced body)"
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b"PayloadTooLarge" in answer


def _pax_bomb(path: Path, header_bytes: int, forge: Forge) -> None:
    """A sound bundle preceded by one pax extended header of ``header_bytes``."""
    record = b" comment=" + b"a" * header_bytes + b"\n"
    length = len(record) + len(str(len(record)))
    length = len(record) + len(str(length))
    body = str(length).encode() + record
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = len(body)
    with path.open("wb") as fh:
        fh.write(header.tobuf(format=tarfile.USTAR_FORMAT))
        fh.write(body + b"\0" * (-len(body) % 512))
        fh.write(forge.bundle())


def test_a_bundle_with_a_huge_pax_header_is_refused_without_reading_it_into_memory(
    tmp_path: Path,
) -> None:
    bomb = tmp_path / "bomb.edgepack"
    forge = Forge()
    _pax_bomb(bomb, 32 << 20, forge)
    tracemalloc.start()
    try:
        with bomb.open("rb") as fh, pytest.raises(TrustError, match="extended tar header"):
            verify_bundle(fh, forge.trust)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated to refuse the bundle"


class _Endless(io.RawIOBase):
    """A stream that starts with ``head`` and then never ends; counts what was read of it."""

    def __init__(self, head: bytes) -> None:
        self._head = head
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = len(buffer)
        data = self._head[:n]
        self._head = self._head[n:]
        data += b"a" * (n - len(data))
        buffer[:n] = data
        self.read_bytes += n
        return n


def _header(name: str, typeflag: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = typeflag
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)


@pytest.mark.parametrize(
    "typeflag", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK]
)
def test_an_extended_header_claiming_gigabytes_is_refused_from_its_header_alone(typeflag: bytes) -> None:
    # The guard hooked tarfile.TarInfo.frombuf, which the tarfile of Debian bookworm's python3
    # (3.11.2-6+deb12u8) no longer calls before reading the extended header: there the bundle
    # was read whole. Now the header is read and bounded by edgepack itself, on any Python.
    stream = _Endless(_header("././@PaxHeader", typeflag, 4 << 30))
    with pytest.raises(TrustError, match="extended tar header of 4294967296 bytes"):
        verify_bundle(io.BufferedReader(stream, buffer_size=512), Forge().trust)
    assert stream.read_bytes <= 64 << 10, f"{stream.read_bytes} bytes read to refuse it"


def test_a_chain_of_small_extended_headers_is_refused() -> None:
    record = b"comment=" + b"a" * 100 + b"\n"
    record = str(len(record) + 4).encode() + b" " + record
    one = _header("././@PaxHeader", tarfile.XHDTYPE, len(record)) + record + bytes(-len(record) % 512)
    stream = _Endless(one * 1000)
    with pytest.raises(TrustError, match="extended headers before one member"):
        verify_bundle(io.BufferedReader(stream, buffer_size=512), Forge().trust)
    assert stream.read_bytes <= 64 << 10


def test_a_pax_size_claiming_terabytes_for_the_manifest_is_refused_unread() -> None:
    record = b"size=1099511627776\n"
    record = str(len(record) + 3).encode() + b" " + record
    head = _header("././@PaxHeader", tarfile.XHDTYPE, len(record)) + record + bytes(-len(record) % 512)
    head += _header(MANIFEST_NAME, tarfile.REGTYPE, 0)
    stream = _Endless(head)
    with pytest.raises(TrustError, match=r"module\.json is larger than allowed"):
        verify_bundle(io.BufferedReader(stream, buffer_size=512), Forge().trust)
    assert stream.read_bytes <= 64 << 10
