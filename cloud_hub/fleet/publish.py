"""Publishing stored desired states to the broker (retained, QoS 1), decided in the database.

What the broker's retained message for a device was last made to be is shared state between
hub replicas, so it lives in the device's ``device_desired`` row (``published_generation``,
``published_cleared``). A publisher:

1. locks the rows of the devices it publishes (``FOR UPDATE``, in id order, a chunk at a time),
2. sends what each row holds *now* — never what some request computed — unless the row says
   exactly that was already published, and
3. records what it published in the same row before the lock is released.

So two replicas (or two requests) publishing at once take turns per device, and a slower one
cannot overwrite a newer retained state with an older one. A publish that fails (broker down,
no acknowledgement) leaves its row marked unpublished: :meth:`DesiredPublisher.publish_pending`,
run by every replica's upkeep every few seconds, finds such rows — including those of a
replica killed between its commit and its publish — and publishes them. The state is stored
either way, so the device also gets it over HTTP.

On SQLite, which has no row locks, one hub process runs and a process lock serialises it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import Table, and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from cloud_hub.db.base import Sessions
from cloud_hub.events import record_event
from cloud_hub.fleet.tables import DeviceDesired

log = logging.getLogger(__name__)

#: Rows locked and published per transaction: bounds how long a lock is held; as many as the
#: link keeps unacknowledged (``mqtt.link.MAX_INFLIGHT``), so a chunk costs one round of acks.
CHUNK = 1000


class DesiredChannel(Protocol):
    """Where desired states go: the hub's MQTT link (or a test's stand-in)."""

    def publish_states(self, states: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
        """Publish each device's state retained (``None`` clears it); why, per device that was
        not acknowledged."""
        ...


def unpublished(session: Session) -> list[str]:
    """Devices whose stored state differs from what was last published for them."""
    query = select(DeviceDesired.device_id).where(
        or_(
            DeviceDesired.published_generation.is_(None),
            DeviceDesired.published_generation != DeviceDesired.generation,
            and_(DeviceDesired.payload.is_(None), DeviceDesired.published_cleared.is_(False)),
            and_(DeviceDesired.payload.is_not(None), DeviceDesired.published_cleared.is_(True)),
        )
    )
    return sorted(session.scalars(query))


def _published(generation: int, payload: bytes | None, published: int | None, cleared: bool) -> bool:
    """Whether the broker was last made to hold exactly what the row holds now."""
    return (published, cleared) == (generation, payload is None)


class DesiredPublisher:
    """Publishes the stored desired state of devices on a channel."""

    def __init__(self, sessions: Sessions, channel: DesiredChannel) -> None:
        self._sessions = sessions
        self._channel = channel
        self._lock = threading.Lock()

    def publish_current(self, device_ids: Sequence[str], *, again: bool = False) -> list[str]:
        """Publish (retained) what the database holds now for each device; clear revoked ones.

        States already published are skipped unless ``again`` (a broker that lost its retained
        messages). Returns one message per device that could not be published (also recorded
        as an event).
        """
        errors: list[str] = []
        ids = sorted(set(device_ids))
        with self._lock:
            for start in range(0, len(ids), CHUNK):
                with self._sessions.begin() as session:
                    errors += self._publish_chunk(session, ids[start : start + CHUNK], again=again)
        if errors:
            log.warning("desired state not published to %d device(s): %s", len(errors), errors[0])
            with self._sessions.begin() as session:
                record_event(
                    session,
                    "publish-failed",
                    f"desired state not published to {len(errors)} device(s) (they will fetch it "
                    f"over HTTP, and the hub retries): {errors[0]}",
                )
        return errors

    def _publish_chunk(self, session: Session, ids: list[str], *, again: bool) -> list[str]:
        # Columns, not ORM rows, and one UPDATE for the chunk: a deploy publishes the fleet.
        query = (
            select(
                DeviceDesired.device_id,
                DeviceDesired.payload,
                DeviceDesired.generation,
                DeviceDesired.published_generation,
                DeviceDesired.published_cleared,
            )
            .where(DeviceDesired.device_id.in_(ids))
            .order_by(DeviceDesired.device_id)
            .with_for_update()
        )
        due = [
            (device_id, payload, generation)
            for device_id, payload, generation, published, cleared in session.execute(query)
            if again or not _published(generation, payload, published, cleared)
        ]
        # The chunk goes out as one batch; only acknowledged rows are marked published, as the
        # generation that was sent, not the row's generation now: SQLite has no row lock, and a
        # change committed meanwhile must stay unpublished until its own state goes out (marked
        # with the row's generation, a state sent after a newer one hid the newer one for good).
        failed = self._channel.publish_states([(device_id, payload) for device_id, payload, _ in due])
        acked = [
            {"b_id": device_id, "b_gen": generation, "b_cleared": payload is None}
            for device_id, payload, generation in due
            if device_id not in failed
        ]
        if acked:
            table = DeviceDesired.__table__
            assert isinstance(table, Table)
            session.execute(
                update(table)
                .where(table.c.device_id == bindparam("b_id"))
                .values(published_generation=bindparam("b_gen"), published_cleared=bindparam("b_cleared")),
                acked,
            )
        return [f"{device_id}: {error}" for device_id, error in sorted(failed.items())]

    def publish_pending(self) -> list[str]:
        """Publish every state not published yet (by this replica or any other); the errors."""
        with self._sessions.begin() as session:
            ids = unpublished(session)
        return self.publish_current(ids) if ids else []

    def republish_all(self) -> list[str]:
        """Publish every device's current state again, e.g. after the broker lost retained messages."""
        with self._sessions.begin() as session:
            ids = list(session.scalars(select(DeviceDesired.device_id)))
        return self.publish_current(ids, again=True)
