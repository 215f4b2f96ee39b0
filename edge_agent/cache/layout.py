"""Where each file of a verified module goes inside its module folder (pure, no I/O).

The manifest model already refuses unsafe paths; this checks again, because a module folder
is built from it with real file system calls, and a second, independent check costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from manifests.errors import TrustError
from manifests.module import MODEL_ROOT, SRC_ROOT, ModuleManifest, check_relative_path

MANIFEST_FILE = "module.json"


@dataclass(frozen=True)
class Placement:
    """One file of a module folder: its relative POSIX path and the blob that fills it."""

    path: str
    digest: str
    size: int


def plan_layout(manifest: ModuleManifest) -> list[Placement]:
    """The files of the module folder in manifest order; :class:`TrustError` on any path
    that is unsafe, outside ``src/``/``model/``, listed twice, or both a file and a folder."""
    placements: list[Placement] = []
    files: set[str] = set()
    folders: set[str] = set()
    for entry in manifest.files:
        try:
            path = check_relative_path(entry.path)
        except ValueError as exc:
            raise TrustError(f"module {manifest.ref}: {exc}; refused") from None
        parts = path.split("/")
        if parts[0] not in (SRC_ROOT, MODEL_ROOT) or len(parts) < 2:
            raise TrustError(
                f"module {manifest.ref}: path {path!r} is not under {SRC_ROOT}/ or {MODEL_ROOT}/"
            )
        parents = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if path in files or path in folders or parents & files:
            raise TrustError(
                f"module {manifest.ref}: path {path!r} clashes with another file; refused"
            )
        files.add(path)
        folders |= parents
        placements.append(Placement(path=path, digest=entry.digest, size=entry.size))
    return placements
