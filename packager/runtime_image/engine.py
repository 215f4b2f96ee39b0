"""The Docker engine side of the runtime image: connect, find a cached image, import the base
rootfs, build the thin layer, tag, push. Everything goes through the docker SDK.

The engine is the cache: a base is found by its tag (which carries the recipe key) and a thin
layer by its label (which carries the thin key); nothing else needs to be kept on disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from manifests.errors import EdgepackError, FetchError, RegistryUnavailable
from manifests.image_ref import parse_image_ref
from packager.runtime_image.recipe import LABEL_BASE_KEY, LABEL_THIN_KEY

#: Seconds one engine call may take: importing or pushing a few hundred MB can be slow.
ENGINE_TIMEOUT_S = 900

Progress = Callable[[int, int | None], None]


def connect(timeout: float = ENGINE_TIMEOUT_S) -> Any:
    """A ``docker.DockerClient`` that answered a ping, or a one-line error saying how to
    start the engine."""
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except docker.errors.DockerException as exc:
        detail = str(exc).removeprefix("Error while fetching server API version: ")
        if "Permission denied" in detail or "PermissionError" in detail:
            hint = "this user may not use its socket: run as root or join the 'docker' group"
        else:
            hint = (
                "start it (as root: 'dockerd &' or 'systemctl start docker'; apt-get install "
                "docker.io installs it) or point DOCKER_HOST at one"
            )
        raise FetchError(f"no Docker engine answers at {where} ({_short(detail, 120)}); {hint}") from None
    return client


def _short(exc: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "…"


def find_base(client: Any, tag: str, key: str) -> Any | None:
    """The local base image ``tag``, when its label says it was built from recipe ``key``."""
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    labels = image.labels or {}
    return image if labels.get(LABEL_BASE_KEY) == key else None


def find_thin(client: Any, key: str) -> Any | None:
    """A local image built from thin key ``key`` (tagged or not), if any."""
    found = client.images.list(filters={"label": f"{LABEL_THIN_KEY}={key}"})
    return found[0] if found else None


def _counting(chunks: Iterable[bytes], progress: Progress | None, total: int | None) -> Iterator[bytes]:
    done = 0
    for chunk in chunks:
        done += len(chunk)
        if progress is not None:
            progress(done, total)
        yield chunk


def import_base(
    client: Any,
    chunks: Iterable[bytes],
    *,
    tag: str,
    changes: list[str],
    progress: Progress | None = None,
    total: int | None = None,
) -> Any:
    """``docker import`` a rootfs tar stream as ``tag``, with Dockerfile ``changes``."""
    ref = parse_image_ref(tag)
    try:
        client.api.import_image_from_stream(
            _counting(chunks, progress, total), repository=ref.repository, tag=ref.tag, changes=changes
        )
        return client.images.get(tag)
    except docker.errors.DockerException as exc:
        raise EdgepackError(f"docker import of {tag} failed: {_short(exc)}") from None


@dataclass(frozen=True)
class BuiltImage:
    image: Any
    log: str


def build_thin(
    client: Any, context: Path, *, labels: dict[str, str], on_line: Callable[[str], None] | None = None
) -> BuiltImage:
    """``docker build`` the context folder (Dockerfile + wheel) without network access."""
    lines: list[str] = []
    image_id: str | None = None
    try:
        stream = client.api.build(
            path=str(context), rm=True, forcerm=True, pull=False, network_mode="none",
            labels=labels, decode=True,
        )  # fmt: skip
        for event in stream:
            if "error" in event:
                detail = " ".join(str(event["error"]).split())
                raise EdgepackError(
                    f"docker build of the runtime image failed: {detail}; the build log: "
                    + " | ".join(line for line in lines[-5:])
                )
            text = str(event.get("stream", "")).strip()
            if text:
                lines.append(text)
                if on_line is not None:
                    on_line(text)
            aux = event.get("aux")
            if isinstance(aux, dict) and "ID" in aux:
                image_id = str(aux["ID"])
    except docker.errors.DockerException as exc:
        raise EdgepackError(f"docker build of the runtime image failed: {_short(exc)}") from None
    if image_id is None:
        raise EdgepackError(
            "docker build of the runtime image ended without an image id: " + " | ".join(lines[-5:])
        )
    return BuiltImage(image=client.images.get(image_id), log="\n".join(lines))


def push(client: Any, reference: str, *, progress: Progress | None = None) -> str:
    """Push ``REGISTRY/NAME:TAG`` and return the manifest digest the registry stored."""
    ref = parse_image_ref(reference)
    layers: dict[str, tuple[int, int]] = {}
    digest: str | None = None
    try:
        for event in client.api.push(ref.repository, tag=ref.tag, stream=True, decode=True):
            if "error" in event:
                raise RegistryUnavailable(
                    f"push of {reference} failed: {' '.join(str(event['error']).split())}; check that "
                    f"the registry {ref.registry} runs and accepts pushes"
                )
            detail = event.get("progressDetail") or {}
            if "id" in event and detail.get("total"):
                layers[str(event["id"])] = (int(detail.get("current", 0)), int(detail["total"]))
                if progress is not None:
                    progress(sum(c for c, _ in layers.values()), sum(t for _, t in layers.values()))
            aux = event.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
    except docker.errors.DockerException as exc:
        raise RegistryUnavailable(
            f"push of {reference} failed: {_short(exc)}; check that the registry {ref.registry} runs"
        ) from None
    if digest is None:
        raise RegistryUnavailable(f"push of {reference}: the engine reported no manifest digest")
    return digest
