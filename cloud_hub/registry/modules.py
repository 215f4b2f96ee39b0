"""The module registry: pushes verified in full before anything becomes visible.

A push streams the ``.edgepack`` through :func:`manifests.bundle.verify_bundle` into a
staging area of the blob store. Only when every signature and every blob digest has checked
out are the new blobs published and the module row committed; a refused push leaves neither
rows nor blobs behind. Blobs the store already holds are not written again.

A module can also be registered from its signed ``module.json`` alone, once every blob it
names is in the store (uploaded with ``PUT /blobs``, each checked against its digest there):
that is how a client sends only the files the hub lacks (``Model.deploy`` in the SDK, whose
model files the hub holds already). The manifest is verified exactly as in a bundle, and the
module appears only if every blob is there with the size the signed manifest gives.

Either way a new version must be signed by a key that may publish its name (its owner or a
granted key, see :mod:`cloud_hub.registry.owners`); the same module pushed again is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from cloud_hub.db.base import Sessions
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.events import record_event
from cloud_hub.registry.blob_refs import lock_registry
from cloud_hub.registry.owners import check_publisher
from cloud_hub.registry.tables import Module, ModuleFile
from cloud_hub.registry.usage import delete_unless_used, lock_fleet
from cloud_hub.store.blobs import BlobStore
from manifests.bundle import verify_bundle
from manifests.errors import TrustError
from manifests.signing import TrustStore
from manifests.verified import VerifiedModule, parse_module_manifest

UNTRUSTED_BY_HUB = (
    "the hub accepts modules signed by the keys it was started with: "
    "'edgepack hub serve --trust PUBLISHER.pub' (or EDGEPACK_HUB_TRUSTED_KEYS)"
)


@dataclass(frozen=True)
class PushResult:
    module: Module
    created: bool
    new_blobs: int
    reused_blobs: int


def get_module(session: Session, name: str, version: str) -> Module:
    """The module ``name:version``; NotFound naming the versions that do exist."""
    module = session.scalar(
        select(Module)
        .where(Module.name == name, Module.version == version)
        .options(selectinload(Module.files))
    )
    if module is not None:
        return module
    known = list(session.scalars(select(Module.version).where(Module.name == name)))
    if known:
        raise NotFound(
            f"module {name}:{version} is not in the registry; known versions: {', '.join(sorted(known))}"
        )
    raise NotFound(
        f"module {name!r} is not in the registry; push it first with 'edgepack push FILE.edgepack'"
    )


def module_by_digest(session: Session, digest: str) -> Module:
    """The module whose ``module.json`` has this digest; NotFound otherwise."""
    module = session.scalar(
        select(Module).where(Module.manifest_digest == digest).options(selectinload(Module.files))
    )
    if module is None:
        raise NotFound(f"no module with manifest digest {digest} is in the registry")
    return module


def list_modules(session: Session, name: str | None = None) -> list[Module]:
    query = select(Module).options(selectinload(Module.files)).order_by(Module.name, Module.id)
    if name is not None:
        query = query.where(Module.name == name)
    return list(session.scalars(query))


def _record(session: Session, verified: VerifiedModule) -> Module:
    manifest = verified.manifest
    module = Module(
        name=manifest.name,
        version=manifest.version,
        manifest_digest=verified.manifest_digest,
        manifest=verified.manifest_bytes,
        signers=verified.signers,
        size=manifest.total_size(),
        files=[ModuleFile(path=f.path, digest=f.digest, size=f.size) for f in manifest.files],
    )
    session.add(module)
    return module


def push_module(
    sessions: Sessions,
    blobs: BlobStore,
    trust: TrustStore,
    stream: IO[bytes],
) -> PushResult:
    """Verify a bundle read from ``stream`` and add it to the registry.

    The caller bounds the stream (see cloud_hub.store.streaming).

    Pushing the very same module again is a no-op (``created`` False); a different module
    under an existing ``name:version`` is a Conflict.
    """
    staging = blobs.staging()
    try:
        # The byte limit is enforced on the stream (TooLarge, 413), not through BundleLimits,
        # whose refusal would read as a trust problem (422).
        verified = verify_bundle(
            stream, trust, sink=staging, what="pushed module", untrusted_hint=UNTRUSTED_BY_HUB
        )
        ref = verified.manifest.ref
        with sessions.begin() as session:
            lock_registry(session)
            existing = _existing(session, verified)
            if existing is not None:
                # Blobs staged for a module already registered replace copies whose bytes no
                # longer match (the store's check let them through): the push repairs them.
                repaired = staging.staged
                staging.publish()
                if repaired:
                    record_event(
                        session,
                        "blob-repaired",
                        f"module {ref} pushed again: {len(repaired)} damaged blob(s) replaced "
                        f"({', '.join(repaired)})",
                    )
                return PushResult(existing, False, len(repaired), len(verified.blob_sizes) - len(repaired))
            # A blob skipped because the store held it may have been removed by a delete that
            # committed since; under the lock that can no longer change, so check once here.
            staged = set(staging.staged)
            missing = [d for d in verified.blob_sizes if d not in staged and not blobs.has(d)]
            if missing:
                raise Conflict(f"blob {missing[0]} was deleted while {ref} was being pushed; push it again")
            check_publisher(session, verified.manifest.name, ref, verified.signers)
            module = _record(session, verified)
            new_blobs = len(staging.staged)
            session.flush()
            # Published before the commit: if the commit fails the blobs are merely unused,
            # whereas the other order could commit a module whose blobs never arrived.
            staging.publish()
            record_event(
                session,
                "module_pushed",
                f"module {ref} pushed ({new_blobs} new blobs, signed by {', '.join(verified.signers)})",
            )
        return PushResult(module, True, new_blobs, len(verified.blob_sizes) - new_blobs)
    except BaseException:
        staging.discard()
        raise


def _existing(session: Session, verified: VerifiedModule) -> Module | None:
    """The module already registered under the pushed name and version, if it is the very
    same one; a Conflict if it is another."""
    manifest = verified.manifest
    existing = session.scalar(
        select(Module)
        .where(Module.name == manifest.name, Module.version == manifest.version)
        .options(selectinload(Module.files))
    )
    if existing is not None and existing.manifest_digest != verified.manifest_digest:
        raise Conflict(
            f"module {manifest.ref} already exists with different content "
            f"({existing.manifest_digest}); build it with a new version"
        )
    return existing


def register_manifest(sessions: Sessions, blobs: BlobStore, trust: TrustStore, data: bytes) -> PushResult:
    """Register a module from its signed ``module.json`` bytes over blobs the store holds.

    Verified as a pushed bundle's manifest is; every blob it names must already be stored
    with the size the manifest gives (a missing one is a Conflict naming it: upload it and
    register again). Nothing is written unless all of that holds.
    """
    verified = parse_module_manifest(data, trust, what="pushed manifest", untrusted_hint=UNTRUSTED_BY_HUB)
    ref = verified.manifest.ref
    with sessions.begin() as session:
        lock_registry(session)
        existing = _existing(session, verified)
        if existing is not None:
            return PushResult(existing, False, 0, len(verified.blob_sizes))
        check_publisher(session, verified.manifest.name, ref, verified.signers)
        # Checked under the registry lock, so a delete or gc cannot take a blob away between
        # this check and the commit that makes the module use it.
        for digest, size in sorted(verified.blob_sizes.items()):
            if not blobs.has(digest):
                raise Conflict(
                    f"blob {digest} of module {ref} is not on the hub; upload it "
                    f"(PUT /api/v1/blobs/{digest}) and register the manifest again"
                )
            held = blobs.size(digest)
            if held != size:
                raise TrustError(f"pushed manifest: blob {digest} has {held} bytes, the manifest says {size}")
        module = _record(session, verified)
        session.flush()
        record_event(
            session,
            "module_pushed",
            f"module {ref} registered from its manifest ({len(verified.blob_sizes)} blobs already "
            f"held, signed by {', '.join(verified.signers)})",
        )
    return PushResult(module, True, 0, len(verified.blob_sizes))


def delete_module(sessions: Sessions, blobs: BlobStore, name: str, version: str) -> list[str]:
    """Remove ``name:version`` unless a deployment uses it; return the blobs freed."""
    with sessions.begin() as session:
        lock_fleet(session)
        lock_registry(session)
        return delete_unless_used(session, blobs, get_module(session, name, version))
