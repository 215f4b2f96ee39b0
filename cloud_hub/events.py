"""The hub's event log: deployed, became Healthy, failed with reason, went offline …

Events live in the database (not in memory) so that every hub replica shows the same feed;
the dashboard's live feed reads events with an id above the last one it saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Index, Integer, String, Table, Text, delete, insert, select
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Mapped, Session, mapped_column

from cloud_hub.db.base import Base, utcnow


class Event(Base):
    __tablename__ = "events"
    # A device's or a service's newest events (the dashboard's device and service pages) are
    # read from these without sorting every event of the device or service.
    __table_args__ = (
        Index("ix_events_device_id_id", "device_id", "id"),
        Index("ix_events_service_id", "service", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    device_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    service: Mapped[str | None] = mapped_column(String(64), index=True, default=None)


def record_event(
    session: Session,
    kind: str,
    message: str,
    *,
    device_id: str | None = None,
    service: str | None = None,
) -> Event:
    event = Event(kind=kind, message=message[:MAX_MESSAGE_CHARS], device_id=device_id, service=service)
    session.add(event)
    return event


#: The longest message an event keeps.
MAX_MESSAGE_CHARS = 4000


@dataclass(frozen=True)
class StoredEvent:
    """An event row as :func:`insert_events` wrote it (what the webhook outbox reads)."""

    id: int
    at: datetime
    kind: str
    message: str
    device_id: str | None = None
    service: str | None = None


@dataclass(frozen=True)
class NewEvent:
    """An event to record, decided before the statement that stores it (ingest's batches)."""

    kind: str
    message: str
    device_id: str | None = None
    service: str | None = None


def insert_events(session: Session, events: Sequence[NewEvent], *, at: datetime) -> list[StoredEvent]:
    """Store ``events`` with one multi-row INSERT (no ORM object per event), in their order;
    the rows as stored, ids included. Deliveries are the caller's: use
    :func:`cloud_hub.webhooks.outbox.record_events`, which adds them."""
    if not events:
        return []
    rows = [
        {"at": at, "kind": e.kind, "message": e.message[:MAX_MESSAGE_CHARS], "device_id": e.device_id,
         "service": e.service}
        for e in events
    ]  # fmt: skip
    # The table, not the entity: a plain INSERT ... RETURNING, no ORM bulk-insert bookkeeping.
    # Every column comes back, so no row needs matching to its parameters: asking for that
    # (sort_by_parameter_order) makes SQLite insert one row per statement.
    table = cast(Table, Event.__table__)
    c = table.c
    stored = session.execute(
        insert(table).returning(c.id, c.at, c.kind, c.message, c.device_id, c.service), rows
    )
    return sorted((StoredEvent(*row) for row in stored), key=lambda e: e.id)


def events_since(session: Session, after_id: int = 0, *, limit: int = 200) -> list[Event]:
    rows = session.scalars(
        select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)
    )
    return list(rows)


def recent_events(session: Session, *, limit: int = 50) -> list[Event]:
    rows = session.scalars(select(Event).order_by(Event.id.desc()).limit(limit))
    return list(reversed(list(rows)))


def trim_events(session: Session, *, keep: int, older_than: datetime) -> int:
    """Delete events older than ``older_than`` and all but the newest ``keep``; returns how many."""
    removed: CursorResult[Any] = session.execute(delete(Event).where(Event.at < older_than))  # type: ignore[assignment]
    count = removed.rowcount or 0
    cutoff = session.scalar(select(Event.id).order_by(Event.id.desc()).offset(keep).limit(1))
    if cutoff is not None:
        older: CursorResult[Any] = session.execute(delete(Event).where(Event.id <= cutoff))  # type: ignore[assignment]
        count += older.rowcount or 0
    return int(count)
