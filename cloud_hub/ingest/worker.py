"""The ingest worker: device messages in, database rows and events out, never blocking paho.

``submit`` is called from the MQTT network thread and only appends to memory:

- ``reported`` and ``online`` are *latest wins* per device: a newer message replaces a pending
  older one of the same device, because only the newest state matters. However slow the
  database, pending state is bounded by the number of devices and never lost.
- ``telemetry`` goes to a bounded FIFO; when it is full the oldest samples are dropped (and
  counted), since a sample that cannot be stored in time is not worth stalling for.

One worker thread takes what is pending in batches and applies a batch in one transaction.
A malformed message is dropped with an event; a batch that fails in the database is retried
message by message, so one bad message cannot take the others down with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.events import record_event
from cloud_hub.ingest.messages import (
    MAX_PAYLOAD_BYTES,
    DeviceMessage,
    Online,
    Rejected,
    Reported,
    TelemetryMessage,
    parse_message,
)
from cloud_hub.ingest.state import BatchView, UnknownDevice, apply_online, apply_reported, apply_telemetry

log = logging.getLogger(__name__)

#: At most one "rejected" event per device (or topic) in this many seconds.
REJECT_EVENT_INTERVAL_S = 60.0


@dataclass
class IngestStats:
    received: int = 0
    coalesced: int = 0  # replaced by a newer pending message of the same device
    dropped_telemetry: int = 0  # oldest samples dropped while the queue was full
    overflow: int = 0  # state messages dropped because too many devices were pending
    rejected: int = 0
    unknown_device: int = 0
    applied: int = 0  # messages whose batch committed (including not-newer ones)
    failed: int = 0  # messages the database refused even on their own


@dataclass(frozen=True)
class _Raw:
    topic: str
    payload: bytes
    retained: bool
    received_at: datetime


class IngestWorker:
    """Applies device messages to the database on its own thread."""

    def __init__(
        self,
        sessions: Sessions,
        *,
        prefix: str,
        telemetry_keep: int,
        max_telemetry_pending: int = 10_000,
        max_state_pending: int = 100_000,
        batch_size: int = 500,
    ) -> None:
        self._sessions = sessions
        self._prefix = prefix
        self._keep = telemetry_keep
        self._batch_size = batch_size
        self._max_state = max_state_pending
        self._states: OrderedDict[str, _Raw] = OrderedDict()  # by topic: latest wins
        self._telemetry: deque[_Raw] = deque(maxlen=max_telemetry_pending)
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_reject: dict[str, float] = {}
        self.stats = IngestStats()

    # --- producer side (MQTT thread) -------------------------------------------------------

    def submit(self, topic: str, payload: bytes, retained: bool) -> None:
        """Queue one message; returns at once whatever the state of the database."""
        # An oversized payload is refused when parsed; until then keep only enough of it to
        # tell, or a device flooding its telemetry topic with huge messages fills the memory.
        raw = _Raw(topic, bytes(payload[: MAX_PAYLOAD_BYTES + 1]), retained, utcnow())
        channel = topic.rsplit("/", 1)[-1]
        with self._cond:
            self.stats.received += 1
            if channel == "telemetry":
                if len(self._telemetry) == self._telemetry.maxlen:
                    self.stats.dropped_telemetry += 1
                self._telemetry.append(raw)
            else:
                if topic in self._states:
                    self.stats.coalesced += 1
                elif len(self._states) >= self._max_state:
                    self.stats.overflow += 1
                    return
                self._states[topic] = raw
            self._cond.notify()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="edgepack-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def pending(self) -> int:
        with self._cond:
            return len(self._states) + len(self._telemetry) + (1 if self._busy else 0)

    def drain(self, timeout: float) -> bool:
        """Wait until everything submitted so far has been applied (True) or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._states or self._telemetry or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    # --- consumer side ---------------------------------------------------------------------

    def _take(self) -> list[_Raw] | None:
        with self._cond:
            while not (self._states or self._telemetry or self._stop):
                self._cond.wait()
            if self._stop and not (self._states or self._telemetry):
                return None
            batch: list[_Raw] = []
            while self._states and len(batch) < self._batch_size:
                batch.append(self._states.popitem(last=False)[1])
            while self._telemetry and len(batch) < self._batch_size:
                batch.append(self._telemetry.popleft())
            self._busy = True
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self.process(batch)
            except Exception:
                log.exception("ingest batch failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def process(self, batch: list[_Raw]) -> None:
        """Parse and apply one batch (public for the benchmark and tests)."""
        messages: list[DeviceMessage] = []
        rejected: list[Rejected] = []
        for raw in batch:
            parsed = parse_message(
                raw.topic,
                raw.payload,
                prefix=self._prefix,
                retained=raw.retained,
                received_at=raw.received_at,
            )
            if isinstance(parsed, Rejected):
                rejected.append(parsed)
            elif parsed is not None:
                messages.append(parsed)
        self._record_rejected(rejected)
        try:
            with self._sessions.begin() as session, session.no_autoflush:
                unknown = self._apply(session, messages)
            self.stats.applied += len(messages) - unknown
            self.stats.unknown_device += unknown
        except Exception:
            log.warning("ingest batch of %d failed; retrying one by one", len(messages), exc_info=True)
            for msg in messages:
                try:
                    with self._sessions.begin() as session, session.no_autoflush:
                        unknown = self._apply(session, [msg])
                    self.stats.applied += 1 - unknown
                    self.stats.unknown_device += unknown
                except Exception:
                    self.stats.failed += 1
                    log.exception("ingest could not store a message from %s", msg.device_id)

    def _apply(self, session: Session, messages: list[DeviceMessage]) -> int:
        """Apply messages in ``session``; returns how many came from unknown devices."""
        unknown = 0
        telemetry: list[TelemetryMessage] = []
        view = BatchView(session, (m.device_id for m in messages))
        for msg in messages:
            try:
                if isinstance(msg, Reported):
                    apply_reported(view, msg)
                elif isinstance(msg, Online):
                    apply_online(view, msg)
                else:
                    telemetry.append(msg)
            except UnknownDevice:
                unknown += 1
        if telemetry:
            unknown += len(telemetry) - apply_telemetry(view, telemetry, keep=self._keep)
        return unknown

    def _record_rejected(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        self.stats.rejected += len(rejected)
        now = time.monotonic()
        if len(self._last_reject) > 10_000:
            # Bounded memory even when a broker without the hub's ACL lets anyone invent ids.
            self._last_reject.clear()
        fresh = []
        for r in rejected:
            key = r.device_id or r.topic
            if now - self._last_reject.get(key, -REJECT_EVENT_INTERVAL_S) >= REJECT_EVENT_INTERVAL_S:
                self._last_reject[key] = now
                fresh.append(r)
        if not fresh:
            return
        try:
            with self._sessions.begin() as session:
                for r in fresh:
                    record_event(
                        session,
                        "rejected",
                        f"dropped a message on {r.topic}: {r.reason}",
                        device_id=r.device_id,
                    )
        except Exception:
            log.exception("could not record rejected-message events")
