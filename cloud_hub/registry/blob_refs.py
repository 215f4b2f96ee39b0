"""Which blobs the registry still uses, and taking the lock that keeps that answer true."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.events import record_event
from cloud_hub.registry.tables import ModelFile, ModuleFile, RegistryLock
from cloud_hub.store.blobs import BlobStore


def lock_registry(session: Session) -> None:
    """Serialise with every other transaction that adds or drops blob references.

    Must be the first statement of the transaction (on SQLite a read before it would pin a
    snapshot that the write lock then cannot upgrade).
    """
    session.execute(update(RegistryLock).where(RegistryLock.id == 1).values(version=RegistryLock.version + 1))


def unreferenced(session: Session, digests: Iterable[str]) -> list[str]:
    """Those of ``digests`` that no module file and no model file names any more."""
    wanted = set(digests)
    if not wanted:
        return []
    used = set(session.scalars(select(ModuleFile.digest).where(ModuleFile.digest.in_(wanted))))
    used |= set(session.scalars(select(ModelFile.digest).where(ModelFile.digest.in_(wanted))))
    return sorted(wanted - used)


def release_blobs(session: Session, blobs: BlobStore, digests: Iterable[str]) -> list[str]:
    """Delete the blobs of ``digests`` nothing uses any more; call after flushing the deletes.

    Runs inside the locked transaction, so a concurrent push cannot start relying on a blob
    between this check and its removal.
    """
    session.flush()
    gone = unreferenced(session, digests)
    for digest in gone:
        blobs.delete(digest)
    return gone


#: A staged upload not written to for this long is a leftover.
PARTIAL_IDLE = timedelta(minutes=10)


def collect_garbage(sessions: Sessions, blobs: BlobStore, *, grace: timedelta) -> list[str]:
    """Delete blobs no module or model names that were stored more than ``grace`` ago.

    Orphans come from uploads never registered (a model upload whose registration failed)
    and from pushes whose commit failed after their blobs were published. The grace period
    protects a blob uploaded moments ago whose registration is still on its way.
    """
    cutoff = utcnow() - grace
    # An upload idle this long was abandoned (a live one writes every few seconds), whatever
    # the grace for finished blobs: crash leftovers are freed by the default gc too.
    blobs.clean_partial(utcnow() - min(grace, PARTIAL_IDLE))
    with sessions.begin() as session:
        lock_registry(session)
        old = [b.digest for b in blobs.iter_blobs() if b.stored_at < cutoff]
        gone = release_blobs(session, blobs, old)
        if gone:
            record_event(session, "blobs_collected", f"{len(gone)} unused blobs deleted")
        return gone
