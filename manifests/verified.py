"""A module manifest checked against a trust store: signatures first, then the payload.

Kept apart from :mod:`manifests.bundle` (the single-file form, which needs ``tarfile``): the
agent fetches manifests and blobs one by one and only ever needs this part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from manifests.digests import sha256_digest
from manifests.errors import TrustError
from manifests.module import ModuleManifest
from manifests.signing import UNTRUSTED_HINT, Envelope, TrustStore, parse_envelope, verify_envelope


@dataclass
class VerifiedModule:
    manifest: ModuleManifest
    envelope: Envelope
    manifest_bytes: bytes
    manifest_digest: str
    signers: list[str]
    blob_sizes: dict[str, int] = field(default_factory=dict)


def parse_module_manifest(
    data: bytes, trust: TrustStore, *, what: str, untrusted_hint: str = UNTRUSTED_HINT
) -> VerifiedModule:
    """Verify the signatures on ``module.json`` bytes, then validate its payload."""
    envelope = parse_envelope(data, what=what)
    signers = verify_envelope(envelope, trust, what=what, untrusted_hint=untrusted_hint)
    try:
        manifest = ModuleManifest.model_validate(envelope.signed)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise TrustError(f"{what}: signed manifest is invalid: {loc}: {err['msg']}") from None
    sizes: dict[str, int] = {}
    for f in manifest.files:
        if sizes.setdefault(f.digest, f.size) != f.size:
            raise TrustError(f"{what}: blob {f.digest} is listed with two different sizes")
    return VerifiedModule(
        manifest=manifest,
        envelope=envelope,
        manifest_bytes=data,
        manifest_digest=sha256_digest(data),
        signers=signers,
        blob_sizes=sizes,
    )
