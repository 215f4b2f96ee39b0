"""Publishing stored desired states to the broker (retained, QoS 1), in rising order.

The publisher always sends what the database holds *now* for a device, never what some
request computed, and one publish runs at a time per hub process; what was already sent is
skipped, so the states a device receives from one hub rise strictly even when several
requests publish at once. A publish that fails is reported and recorded as an event: the
state is stored, so the device still gets it over HTTP, and upkeep publishes it again later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import select

from cloud_hub.db.base import Sessions
from cloud_hub.events import record_event
from cloud_hub.fleet.tables import DeviceDesired
from manifests.errors import FetchError

log = logging.getLogger(__name__)


class DesiredChannel(Protocol):
    """Where desired states go: the hub's MQTT link (or a test's stand-in)."""

    def publish_desired(self, device_id: str, payload: bytes) -> None: ...

    def clear_desired(self, device_id: str) -> None: ...


class DesiredPublisher:
    """Publishes the stored desired state of devices on a channel."""

    def __init__(self, sessions: Sessions, channel: DesiredChannel) -> None:
        self._sessions = sessions
        self._channel = channel
        self._lock = threading.Lock()
        self._sent: dict[str, tuple[int, bool]] = {}  # device -> (generation, cleared)

    def publish_current(self, device_ids: Sequence[str]) -> list[str]:
        """Publish (retained) what the database holds now for each device; clear revoked ones.

        Returns one message per device that could not be published (also recorded as an event).
        """
        if not device_ids:
            return []
        errors: list[str] = []
        with self._lock:
            with self._sessions.begin() as session:
                query = select(DeviceDesired).where(DeviceDesired.device_id.in_(device_ids))
                rows = {r.device_id: (r.generation, r.payload) for r in session.scalars(query)}
            for device_id in device_ids:
                generation, payload = rows.get(device_id, (0, None))
                current = (generation, payload is None)
                if self._sent.get(device_id) == current:
                    continue
                try:
                    if payload is None:
                        self._channel.clear_desired(device_id)
                    else:
                        self._channel.publish_desired(device_id, payload)
                except FetchError as exc:
                    errors.append(f"{device_id}: {exc}")
                    continue
                self._sent[device_id] = current
        if errors:
            log.warning("desired state not published to %d device(s): %s", len(errors), errors[0])
            with self._sessions.begin() as session:
                record_event(
                    session,
                    "publish-failed",
                    f"desired state not published to {len(errors)} device(s) (they will fetch it "
                    f"over HTTP): {errors[0]}",
                )
        return errors

    def republish_all(self) -> list[str]:
        """Publish every device's current state again, e.g. after the broker lost retained messages."""
        with self._lock:
            self._sent.clear()
        with self._sessions.begin() as session:
            ids = list(session.scalars(select(DeviceDesired.device_id)))
        return self.publish_current(ids)
