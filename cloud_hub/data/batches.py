"""The database side of collected data: who may send a service's data, the rows of stored
batches, the listing, and retention. Each function takes the caller's session."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cloud_hub.data.check import BatchSummary
from cloud_hub.data.tables import DataBatch, DataSource
from cloud_hub.fleet.tables import DeviceDesired
from cloud_hub.ingest.tables import TelemetrySample
from manifests.data import BatchKey, StoredBatch

#: Rows deleted per retention statement (a year of a large fleet is not one transaction).
PRUNE_CHUNK = 1000


def note_services_left(session: Session, device_id: str, services: Iterable[str], *, now: datetime) -> None:
    """Record that ``services`` left the device's desired state at ``now``."""
    for service in services:
        session.merge(DataSource(device_id=device_id, service=service, removed_at=now))


def may_send(session: Session, device_id: str, service: str, *, now: datetime, grace: timedelta) -> bool:
    """Whether the device may upload data of ``service``: its desired state names it now, or
    named it until less than ``grace`` ago."""
    payload = session.scalar(select(DeviceDesired.payload).where(DeviceDesired.device_id == device_id))
    # The hub wrote and signed these bytes itself: a plain JSON parse, no validation.
    if payload is not None and any(m["service"] == service for m in json.loads(payload)["signed"]["modules"]):
        return True
    removed_at = session.scalar(
        select(DataSource.removed_at).where(DataSource.device_id == device_id, DataSource.service == service)
    )
    return removed_at is not None and removed_at >= now - grace


def find(session: Session, device_id: str, digest: str) -> DataBatch | None:
    return session.scalar(
        select(DataBatch).where(DataBatch.device_id == device_id, DataBatch.digest == digest)
    )


def add(
    session: Session,
    *,
    device_id: str,
    digest: str,
    key: BatchKey,
    size: int,
    summary: BatchSummary,
    path: str,
) -> DataBatch:
    row = DataBatch(
        digest=digest,
        device_id=device_id,
        service=key.service,
        model=key.model,
        model_version=key.model_version,
        designation=key.designation,
        day=key.day,
        records=summary.records,
        bytes=size,
        first_at=summary.first_at,
        last_at=summary.last_at,
        path=path,
    )
    session.add(row)
    return row


def stored(row: DataBatch) -> StoredBatch:
    return StoredBatch(
        digest=row.digest,
        device_id=row.device_id,
        key=BatchKey(
            service=row.service,
            model=row.model,
            model_version=row.model_version,
            designation=row.designation,
            day=row.day,
        ),
        records=row.records,
        bytes=row.bytes,
        received_at=row.received_at,
        first_at=row.first_at,
        last_at=row.last_at,
        path=row.path,
    )


@dataclass(frozen=True)
class BatchFilter:
    """Which of a service's batches a listing wants; every field optional."""

    since: datetime | None = None
    until: datetime | None = None
    designation: str | None = None
    model: str | None = None
    device: str | None = None


def page(session: Session, service: str, where: BatchFilter, *, after: int, limit: int) -> list[DataBatch]:
    """Up to ``limit`` batches of ``service`` with an id above ``after``, oldest first. A batch
    is in the window [since, until) when any of its records is."""
    query = select(DataBatch).where(DataBatch.service == service, DataBatch.id > after)
    if where.since is not None:
        query = query.where(DataBatch.last_at >= where.since)
    if where.until is not None:
        query = query.where(DataBatch.first_at < where.until)
    if where.designation is not None:
        query = query.where(DataBatch.designation == where.designation)
    if where.model is not None:
        query = query.where(DataBatch.model == where.model)
    if where.device is not None:
        query = query.where(DataBatch.device_id == where.device)
    return list(session.scalars(query.order_by(DataBatch.id).limit(limit)))


def spool_figures(session: Session, service: str, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """device → the newest telemetry's ``data_spooled_bytes``/``data_dropped_total`` of the
    service and that sample's time (a device whose newest sample has neither is left out)."""
    out: dict[str, dict[str, Any]] = {}
    for device_id in device_ids:
        sample = session.execute(
            select(TelemetrySample.payload, TelemetrySample.ts)
            .where(TelemetrySample.device_id == device_id)
            .order_by(TelemetrySample.id.desc())
            .limit(1)
        ).first()
        if sample is None:
            continue
        payload, ts = sample
        for module in payload.get("modules", []):
            if module.get("service") != service:
                continue
            figures = {k: module.get(k) for k in ("data_spooled_bytes", "data_dropped_total")}
            if any(v is not None for v in figures.values()):
                out[device_id] = {**figures, "at": ts.isoformat()}
    return out


def service_rows(
    session: Session, service: str, *, device: str | None, until: datetime | None
) -> list[tuple[int, str]]:
    """Up to PRUNE_CHUNK of ``service``'s batches (of one device, received before ``until``,
    when given): (row id, store key). The caller deletes the objects, then :func:`delete_rows`."""
    query = select(DataBatch.id, DataBatch.path).where(DataBatch.service == service)
    if device is not None:
        query = query.where(DataBatch.device_id == device)
    if until is not None:
        query = query.where(DataBatch.received_at < until)
    return [(r.id, r.path) for r in session.execute(query.order_by(DataBatch.id).limit(PRUNE_CHUNK))]


def old_rows(session: Session, *, older_than: datetime) -> list[tuple[int, str]]:
    """Up to PRUNE_CHUNK batches received before ``older_than``: (row id, store key)."""
    query = select(DataBatch.id, DataBatch.path).where(DataBatch.received_at < older_than)
    return [(r.id, r.path) for r in session.execute(query.order_by(DataBatch.id).limit(PRUNE_CHUNK))]


def delete_rows(session: Session, ids: Sequence[int]) -> None:
    if ids:
        session.execute(delete(DataBatch).where(DataBatch.id.in_(list(ids))))


def forget_old_sources(session: Session, *, older_than: datetime) -> None:
    session.execute(delete(DataSource).where(DataSource.removed_at < older_than))
