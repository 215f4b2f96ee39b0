"""Container image references, as the module manifest records a runtime image.

A manifest's ``runtime.image`` is a reference a person can read (``REGISTRY/NAME[:TAG]``) and
``runtime.image_digest`` the manifest digest that pins it. The docker runtime pulls
``REGISTRY/NAME@DIGEST`` (:meth:`ImageRef.pinned`): a tag can move, a digest cannot, and the
digest is covered by the publisher's signature.

The grammar is Docker's (``distribution/reference``): an optional registry host (it has a
``.`` or ``:``, or is ``localhost``), lower-case path components, an optional tag, an
optional ``@sha256:`` digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from manifests.digests import is_digest

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
_DOMAIN_RE = re.compile(_DOMAIN)
_PATH_COMPONENT_RE = re.compile(_PATH_COMPONENT)
_TAG_RE = re.compile(_TAG)

#: Docker Hub, where a reference without a registry host points
DEFAULT_REGISTRY = "docker.io"


@dataclass(frozen=True)
class ImageRef:
    """``repository[:tag][@digest]``; ``repository`` includes the registry host when given."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The reference without its digest: what ``runtime.image`` records."""
        return self.repository + (f":{self.tag}" if self.tag else "")

    @property
    def registry(self) -> str:
        """The registry host (and port) the image is pulled from."""
        first, sep, _ = self.repository.partition("/")
        return first if sep and _is_domain(first) else DEFAULT_REGISTRY

    @property
    def canonical_repository(self) -> str:
        """The repository with Docker's implied parts spelt out (``docker.io/library/x``), so
        two spellings of one repository compare equal."""
        first, sep, rest = self.repository.partition("/")
        if sep and _is_domain(first):
            domain, path = first, rest
        else:
            domain, path = DEFAULT_REGISTRY, self.repository
        if domain == DEFAULT_REGISTRY and "/" not in path:
            path = f"library/{path}"
        return f"{domain}/{path}"

    def pinned(self, digest: str | None = None) -> str:
        """``repository@digest``: the reference that can only ever mean one image."""
        chosen = digest or self.digest
        if chosen is None:
            raise ValueError(f"{self}: no digest to pin it by")
        return f"{self.repository}@{chosen}"

    def __str__(self) -> str:
        return self.name + (f"@{self.digest}" if self.digest else "")


def _is_domain(component: str) -> bool:
    return ("." in component or ":" in component or component == "localhost") and bool(
        _DOMAIN_RE.fullmatch(component)
    )


def parse_image_ref(text: str) -> ImageRef:
    """Parse ``[REGISTRY/]PATH[:TAG][@sha256:HEX]``; raises ``ValueError`` naming the fault."""
    rest, at, digest = text.partition("@")
    if at and not is_digest(digest):
        raise ValueError(f"image reference {text!r}: the digest must be sha256:<64 hex digits>")
    repository, tag = rest, None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        repository, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise ValueError(f"image reference {text!r}: {tag!r} is not a valid tag")
    if not repository:
        raise ValueError(f"image reference {text!r}: no repository name")
    parts = repository.split("/")
    path = parts[1:] if len(parts) > 1 and _is_domain(parts[0]) else parts
    for part in path:
        if not _PATH_COMPONENT_RE.fullmatch(part):
            raise ValueError(
                f"image reference {text!r}: {part!r} is not a valid repository name component "
                "(lower-case letters, digits and . _ - separators)"
            )
    return ImageRef(repository=repository, tag=tag, digest=digest or None)
