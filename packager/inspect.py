"""Opening bundles from disk, verified or (for display only) not."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from manifests.bundle import MANIFEST_NAME, BlobSink, verify_bundle
from manifests.errors import ConfigError, TrustError
from manifests.module import ModuleManifest
from manifests.signing import Envelope, TrustStore, parse_envelope
from manifests.verified import VerifiedModule


def open_verified(
    path: Path,
    trust: TrustStore,
    *,
    sink: BlobSink | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifiedModule:
    """Verify the bundle at ``path``; a :class:`TrustError` names the first problem."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise ConfigError(f"{path}: bundle not found") from None
    with fh:
        return verify_bundle(fh, trust, sink=sink, progress=progress, what=str(path))


def read_unverified(path: Path) -> tuple[bytes, Envelope, ModuleManifest]:
    """Read ``module.json`` without checking signatures (for ``inspect``)."""
    try:
        with tarfile.open(path, mode="r|") as tar:
            member = next(iter(tar), None)
            if member is None or member.name != MANIFEST_NAME or not member.isreg():
                raise TrustError(f"{path}: not a module bundle (no {MANIFEST_NAME} first)")
            fh = tar.extractfile(member)
            assert fh is not None
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: bundle not found") from None
    except tarfile.TarError as exc:
        raise TrustError(f"{path}: not a module bundle ({exc})") from None
    envelope = parse_envelope(data, what=str(path))
    try:
        manifest = ModuleManifest.model_validate(envelope.signed)
    except ValidationError as exc:
        raise TrustError(f"{path}: manifest is invalid ({exc.errors()[0]['msg']})") from None
    return data, envelope, manifest
