"""Opening bundles from disk, verified or (for display only) not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from manifests.bundle import MANIFEST_NAME, BlobSink, BundleLimits, verify_bundle
from manifests.errors import ConfigError, TrustError
from manifests.module import ModuleManifest
from manifests.signing import Envelope, TrustStore, parse_envelope
from manifests.tar_stream import TarFormatError, TarReader
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
        with path.open("rb") as fh:
            reader = TarReader(fh)
            member = next(reader.members(), None)
            if member is None or member.name != MANIFEST_NAME or not member.isreg():
                raise TrustError(f"{path}: not a module bundle (no {MANIFEST_NAME} first)")
            data = reader.read_all(BundleLimits().max_manifest_bytes)
    except FileNotFoundError:
        raise ConfigError(f"{path}: bundle not found") from None
    except TarFormatError as exc:
        raise TrustError(f"{path}: not a module bundle ({exc})") from None
    envelope = parse_envelope(data, what=str(path))
    try:
        manifest = ModuleManifest.model_validate(envelope.signed)
    except ValidationError as exc:
        raise TrustError(f"{path}: manifest is invalid ({exc.errors()[0]['msg']})") from None
    return data, envelope, manifest
