"""Container images that are not edgepack's, built offline, for the docker runtime's tests of
custom base images (an Azure user's ``environment.docker.baseImage``).

``foreign_images`` (session) gives two images pushed to this worker's ``registry``:

- ``python``: Debian bookworm minbase with its own ``/usr/bin/python3`` (3.11) and the scoring
  server's third-party packages installed the way a Dockerfile's ``pip install`` puts them, in
  ``/usr/local/lib/python3.11/dist-packages``; no venv, no ``edgepack`` user, no entry point,
  no label of ours, and no edgepack code at all;
- ``lacking``: the same without onnxruntime and uvicorn.

Nothing is downloaded: the root file system is the runtime image's cached base
(``edgepack/runtime-base``, which the ``runtime_image`` fixture builds from debootstrap's
minbase and the pinned wheels), exported, rewritten as it streams (the venv's site-packages
moved to the system's dist-packages, edgepack's venv and user dropped) and imported as one
layer. Both images are cached in the engine by a hash of their inputs (the base image's id
and :data:`RECIPE`), so a session reuses them in about a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import docker.errors
import pytest

from packager.runtime_image import engine
from packager.runtime_image.builder import QuietReporter, build_lock
from packager.runtime_image.recipe import RUNTIME_USER, VENV
from tests.docker_fixtures import RUNTIME_CACHE, PushedRuntimeImage, Registry

__all__ = ["ForeignImage", "ForeignImages", "foreign_images"]

#: Raised whenever the way the images are made changes (it is part of their cache key).
RECIPE = 1
REPOSITORY = "edgepack-test/foreign-python"
LACKING_REPOSITORY = "edgepack-test/foreign-python-lacking"
LABEL_KEY = "org.edgepack.test.foreign.key"
SITE = f"{VENV.lstrip('/')}/lib/python3.11/site-packages"
DIST = "usr/local/lib/python3.11/dist-packages"
#: What the ``lacking`` image removes from ``DIST``.
REMOVED = ("onnxruntime", "uvicorn")
_ACCOUNT_FILES = ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow")
_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
]


@dataclass(frozen=True)
class ForeignImage:
    tagged: str  # REGISTRY/acme/python:TAG, what a module records
    digest: str
    image_id: str

    @property
    def runtime(self) -> dict[str, str]:
        """The manifest's ``runtime`` for a module pinned to this image."""
        return {"image": self.tagged, "image_digest": self.digest}


@dataclass(frozen=True)
class ForeignImages:
    python: ForeignImage
    lacking: ForeignImage


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (the engine's export stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            try:
                self._left = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _moved(name: str) -> str | None:
    """Where a member of the base goes in the foreign image (None: left out)."""
    name = name.removeprefix("./").rstrip("/")
    if name == SITE or name.startswith(SITE + "/"):
        return DIST + name[len(SITE) :]
    if name == "opt/edgepack" or name.startswith("opt/edgepack/"):
        return None  # edgepack's venv: its packages moved above, the rest (bin, cfg) goes
    return name


def _without_user(data: bytes) -> bytes:
    lines = data.decode().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith(f"{RUNTIME_USER}:")).encode()


def rewrite_rootfs(source: Iterable[bytes], out: BinaryIO) -> None:
    """Copy the base's exported tar to ``out`` as the foreign root file system."""
    with (
        tarfile.open(fileobj=io.BufferedReader(_ChunkReader(source), 1 << 20), mode="r|") as src,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as dst,
    ):
        # The engine refuses a path twice: a folder this adds (the parents of DIST, which the
        # export may list only later) is not copied again.
        emitted: set[str] = set()
        for member in src:
            target = _moved(member.name)
            if target is None or (member.isdir() and target in emitted):
                continue
            if "/edge_agent" in target or "/manifests" in target:
                raise AssertionError(f"edgepack code in the base image: {member.name}")
            if target.startswith(DIST + "/") and DIST not in emitted:
                for parent in ("usr/local/lib", "usr/local/lib/python3.11", DIST):
                    if parent not in emitted:
                        folder = tarfile.TarInfo(parent)
                        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
                        dst.addfile(folder)
                        emitted.add(parent)
            emitted.add(target)
            member.name = target
            if member.islnk():
                linked = _moved(member.linkname)
                if linked is None:
                    continue
                member.linkname = linked
            if member.isreg():
                fh = src.extractfile(member)
                assert fh is not None
                data = fh.read()
                if target in _ACCOUNT_FILES:
                    data = _without_user(data)
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
            else:
                dst.addfile(member)


def _find(client: Any, tag: str, key: str) -> Any | None:
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    return image if (image.labels or {}).get(LABEL_KEY) == key else None


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([RECIPE, *parts]).encode()).hexdigest()


def _import_foreign(client: Any, base_id: str, key: str) -> Any:
    tag = f"{REPOSITORY}:{key[:16]}"
    exporter = client.containers.create(base_id, command=["true"])
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out:
                rewrite_rootfs(exporter.export(chunk_size=1 << 20), out)
        except BaseException as exc:  # handed to the importing thread
            failure.append(exc)

    reader = os.fdopen(read_fd, "rb")

    def chunks() -> Iterator[bytes]:
        while data := reader.read(1 << 20):
            yield data

    thread = threading.Thread(target=produce, name="foreign-rootfs", daemon=True)
    thread.start()
    try:
        image = engine.import_base(client, chunks(), tag=tag, changes=[*_CHANGES, f"LABEL {LABEL_KEY}={key}"])
    finally:
        reader.close()  # a failed import ends the writer (broken pipe) instead of blocking it
        thread.join(timeout=600)
        exporter.remove(force=True)
    if failure:
        raise failure[0]
    return image


def _build_lacking(client: Any, foreign: Any, key: str) -> Any:
    removed = " ".join(f"{DIST}/{name} {DIST}/{name}-*.dist-info" for name in REMOVED)
    dockerfile = f"FROM {foreign.id}\nRUN rm -rf {' '.join('/' + p for p in removed.split())}\n"
    image, _log = client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()),
        tag=f"{LACKING_REPOSITORY}:{key[:16]}",
        labels={LABEL_KEY: key},
        network_mode="none",
        rm=True,
        forcerm=True,
    )
    return image


def _push(client: Any, image: Any, reference: str) -> ForeignImage:
    repository, tag = reference.rsplit(":", 1)
    image.tag(repository, tag)
    digest = engine.push(client, reference)
    return ForeignImage(tagged=reference, digest=digest, image_id=str(image.id))


@pytest.fixture(scope="session")
def foreign_images(
    docker_engine: Any, registry: Registry, runtime_image: PushedRuntimeImage
) -> ForeignImages:
    base_id = runtime_image.build.base_id
    key = _key(base_id, SITE, DIST)
    lacking_key = _key(key, REMOVED)
    with build_lock(RUNTIME_CACHE, QuietReporter()):  # one builder per machine at a time
        foreign = _find(docker_engine, f"{REPOSITORY}:{key[:16]}", key)
        if foreign is None:
            foreign = _import_foreign(docker_engine, base_id, key)
        lacking = _find(docker_engine, f"{LACKING_REPOSITORY}:{lacking_key[:16]}", lacking_key)
        if lacking is None:
            lacking = _build_lacking(docker_engine, foreign, lacking_key)
    python = _push(docker_engine, foreign, f"{registry.host}/acme/python:3.11")
    short = _push(docker_engine, lacking, f"{registry.host}/acme/python:3.11-lacking")
    return ForeignImages(python=python, lacking=short)
