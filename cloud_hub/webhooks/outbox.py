"""The outbox: an event's deliveries are written in the transaction that records the event.

A listener on every ORM session's flush sees the :class:`~cloud_hub.events.Event` rows just
inserted and adds one delivery per subscription that wants the event; events stored in bulk
(:func:`record_events`, ingest's batches) get theirs the same way right after their INSERT.
So an event that commits has its deliveries committed with it (none lost to a crash between
the two, none to ``trim_events``), and an event rolled back sends nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import event as sa_event
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, UOWTransaction

from cloud_hub.db.base import utcnow
from cloud_hub.events import Event, NewEvent, StoredEvent, insert_events
from cloud_hub.webhooks.catalog import envelope, event_type, wanted
from cloud_hub.webhooks.tables import PENDING, Delivery, Subscription


class EventRow(Protocol):
    """What a delivery is made of: an ORM :class:`Event` after its flush, or a
    :class:`StoredEvent`."""

    @property
    def id(self) -> int: ...
    @property
    def at(self) -> datetime: ...
    @property
    def kind(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def device_id(self) -> str | None: ...
    @property
    def service(self) -> str | None: ...


def deliveries_for(session: Session, events: Sequence[EventRow]) -> list[dict[str, Any]]:
    """The delivery rows for ``events`` (already stored, so with ids)."""
    typed = [(e, t) for e in events if (t := event_type(e.kind)) is not None]
    if not typed:
        return []
    subs = session.connection().execute(
        select(Subscription.id, Subscription.events, Subscription.filters).order_by(Subscription.id)
    ).all()
    if not subs:
        return []
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for ev, type_ in sorted(typed, key=lambda pair: pair[0].id):
        targets = [
            s.id for s in subs if wanted(s.events or [], s.filters or {}, type_, ev.device_id, ev.service)
        ]
        if not targets:
            continue
        env = envelope(
            event_id=ev.id,
            kind=ev.kind,
            type_=type_,
            message=ev.message,
            at=ev.at or now,
            device_id=ev.device_id,
            service=ev.service,
        )
        for sub_id in targets:
            rows.append(
                {
                    "subscription_id": sub_id,
                    "event_id": ev.id,
                    "message_id": env.message_id,
                    "subject": env.subject,
                    "body": env.body,
                    "state": PENDING,
                    "attempts": 0,
                    "created_at": now,
                    "next_attempt_at": now,
                    "last_error": None,
                    "done_at": None,
                }
            )
    return rows


@sa_event.listens_for(Session, "after_flush")
def _enqueue(session: Session, _flush: UOWTransaction) -> None:
    # After the flush the new events have their ids; session.new still lists them.
    fresh = [obj for obj in session.new if isinstance(obj, Event)]
    if not fresh:
        return
    rows = deliveries_for(session, fresh)
    if rows:
        session.connection().execute(insert(Delivery), rows)


def record_events(session: Session, events: Sequence[NewEvent], *, at: datetime) -> list[StoredEvent]:
    """Store ``events`` in bulk (:func:`cloud_hub.events.insert_events`) with their deliveries."""
    stored = insert_events(session, events, at=at)
    rows = deliveries_for(session, stored)
    if rows:
        session.connection().execute(insert(Delivery), rows)
    return stored
