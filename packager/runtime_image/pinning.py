"""Pinning a module's runtime image by digest at build time (``edgepack build --runtime-image``).

A reference that carries ``@sha256:…`` is recorded as given. A tag is resolved, through the
Docker engine, first from the local image's ``RepoDigests`` for that repository (what this
machine pushed or pulled: no network, and the image that was tested here), else from the
registry's distribution API. When neither answers, the image is recorded without a digest
and the caller warns: the docker runtime refuses an unpinned image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from manifests.errors import ConfigError, EdgepackError
from manifests.image_ref import ImageRef, parse_image_ref

#: Resolving must not hold a build up for long when an engine or registry does not answer.
RESOLVE_TIMEOUT_S = 20


@dataclass(frozen=True)
class ImagePin:
    """What a manifest records for a runtime image, and where the digest came from."""

    image: str
    digest: str | None
    source: str  # "given", "local", "registry" or "none"
    problem: str | None = None

    def warning(self) -> str | None:
        """The one line to print when the image stays unpinned."""
        if self.digest is not None:
            return None
        return (
            f"runtime image {self.image} recorded without a digest ({self.problem}); the docker "
            "runtime refuses an unpinned image: push it and build again, or pass NAME@sha256:…"
        )


def parse_reference(text: str, what: str = "--runtime-image") -> ImageRef:
    try:
        return parse_image_ref(text.strip())
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def local_digest(ref: ImageRef, repo_digests: list[str]) -> str | None:
    """The digest among an image's ``RepoDigests`` that belongs to ``ref``'s repository."""
    want = ref.canonical_repository
    for entry in repo_digests:
        try:
            candidate = parse_image_ref(entry)
        except ValueError:
            continue
        if candidate.digest and candidate.canonical_repository == want:
            return candidate.digest
    return None


def pin_image(text: str, *, client: Any | None = None, what: str = "--runtime-image") -> ImagePin:
    """Resolve ``text`` to what the manifest records. Never raises for an unreachable engine
    or registry (that is an :class:`ImagePin` without digest); raises ``ConfigError`` for a
    reference that is not one (``what`` names where it came from)."""
    ref = parse_reference(text, what)
    if ref.digest is not None:
        return ImagePin(image=ref.name, digest=ref.digest, source="given")
    import docker.errors  # the docker SDK only when a tag has to be resolved

    from packager.runtime_image.engine import connect

    try:
        docker_client = client or connect(timeout=RESOLVE_TIMEOUT_S)
    except EdgepackError as exc:
        return ImagePin(image=ref.name, digest=None, source="none", problem=str(exc).split(";", 1)[0])
    reasons: list[str] = []
    try:
        local = docker_client.images.get(ref.name)
    except docker.errors.ImageNotFound:
        reasons.append("no local image")
    except docker.errors.DockerException as exc:
        reasons.append(f"local image: {_short(exc)}")
    else:
        digest = local_digest(ref, list(local.attrs.get("RepoDigests") or []))
        if digest is not None:
            return ImagePin(image=ref.name, digest=digest, source="local")
        reasons.append(f"the local image was never pushed to or pulled from {ref.registry}")
    try:
        remote = docker_client.images.get_registry_data(ref.name)
    except docker.errors.DockerException as exc:
        reasons.append(f"registry {ref.registry}: {_short(exc)}")
    else:
        return ImagePin(image=ref.name, digest=str(remote.id), source="registry")
    return ImagePin(image=ref.name, digest=None, source="none", problem="; ".join(reasons))


#: Where an inference configuration names its image (Azure ML's ``environment.docker.baseImage``,
#: or the legacy top-level ``baseImage``).
BASE_IMAGE_SOURCE = "the inference configuration's baseImage"


def pin_base_image(text: str, *, client: Any | None = None) -> ImagePin:
    """The image an inference configuration names (``environment.docker.baseImage``), pinned
    as ``--runtime-image`` is; refused with a ``ConfigError`` when it cannot be pinned: an
    image the configuration asks for is never recorded unpinned (the docker runtime would
    refuse it on every device), nor silently dropped."""
    pin = pin_image(text, client=client, what=BASE_IMAGE_SOURCE)
    if pin.digest is None:
        raise ConfigError(
            f"{BASE_IMAGE_SOURCE} {pin.image} cannot be pinned to a digest ({pin.problem}): pull "
            "it, or push it to a registry the devices reach, so that this machine's Docker knows "
            "its digest; or name the image with --runtime-image REF@sha256:…"
        )
    return pin


def _short(exc: BaseException) -> str:
    # An API error's explanation is the engine's own sentence ("Get …: connection refused");
    # its str() wraps that in the HTTP request the SDK made.
    text = " ".join(str(getattr(exc, "explanation", None) or exc).split())
    return text if len(text) <= 160 else text[:160] + "…"
