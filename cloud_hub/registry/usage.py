"""Which deployments use a module or a model: a delete of either is refused while any does.

A model counts as used when a deployed module's signed manifest names it as a model it was
built from (``manifests.module.MODEL_TAG_PREFIX`` tags, which ``Model.deploy`` and
``edgepack deploy --ic`` write). Byte-identical files in another service's module do not make
it used: its blobs stay held by that module's own file rows whatever happens to the model.
"""

from __future__ import annotations

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from cloud_hub.errors import Conflict
from cloud_hub.events import record_event
from cloud_hub.fleet.tables import Deployment, FleetLock
from cloud_hub.registry.blob_refs import release_blobs
from cloud_hub.registry.tables import ModelVersion, Module, ModuleFile
from cloud_hub.store.blobs import BlobStore
from manifests.module import MODEL_ROOT, tagged_models
from manifests.signing import parse_envelope


def lock_fleet(session: Session) -> None:
    """Serialise with deploys (FLEET takes this row first), so none can start using what
    this transaction is about to delete between the check and the commit."""
    session.execute(update(FleetLock).where(FleetLock.id == 1).values(version=FleetLock.version + 1))


def deployments_using_module(session: Session, module: Module) -> list[str]:
    rows = session.scalars(
        select(Deployment.name)
        .where(
            or_(
                Deployment.manifest_digest == module.manifest_digest,
                (Deployment.module_name == module.name) & (Deployment.module_version == module.version),
            )
        )
        .order_by(Deployment.name)
    )
    return list(rows)


def deployments_using_model(session: Session, model: ModelVersion) -> list[str]:
    digests = {f.digest for f in model.files}
    if not digests:
        return []
    # A module built from the model holds its files: the digests narrow the deployments to
    # read, the module's signed tags decide.
    candidates = session.execute(
        select(Deployment.name, Module.manifest)
        .join(Module, Module.manifest_digest == Deployment.manifest_digest)
        .where(
            Module.id.in_(
                select(ModuleFile.module_id).where(
                    ModuleFile.path.startswith(MODEL_ROOT + "/"), ModuleFile.digest.in_(digests)
                )
            )
        )
        .order_by(Deployment.name)
    )
    return [
        name
        for name, manifest in candidates
        if model.ref in tagged_models(parse_envelope(manifest, what="stored manifest").signed.get("tags", {}))
    ]


def refuse_if_used(what: str, deployments: list[str]) -> None:
    if deployments:
        names = ", ".join(repr(d) for d in deployments)
        plural = "s" if len(deployments) > 1 else ""
        raise Conflict(
            f"{what} is used by deployment{plural} {names}; delete or update "
            f"{'them' if plural else 'it'} first ('edgepack service delete NAME')"
        )


def delete_unless_used(session: Session, blobs: BlobStore, entry: Module | ModelVersion) -> list[str]:
    """Delete a module or model version no deployment uses, then the blobs only it named;
    return those. The caller holds ``lock_fleet`` and ``lock_registry``, taken first."""
    if isinstance(entry, Module):
        kind, users = "module", deployments_using_module(session, entry)
    else:
        kind, users = "model", deployments_using_model(session, entry)
    refuse_if_used(f"{kind} {entry.ref}", users)
    digests = [f.digest for f in entry.files]
    session.delete(entry)
    freed = release_blobs(session, blobs, digests)
    record_event(session, f"{kind}_deleted", f"{kind} {entry.ref} deleted")
    return freed
