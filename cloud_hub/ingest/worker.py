"""The ingest worker: device messages in, database rows and events out, never blocking paho.

``submit`` is called from the MQTT network thread and only appends to memory:

- ``reported`` and ``online`` are *latest wins* per device: a newer message replaces a pending
  older one of the same device, because only the newest state matters. However slow the
  database, pending state is bounded by the number of devices and never lost.
- ``telemetry`` goes to a bounded FIFO; when it is full the oldest samples are dropped (and
  counted), since a sample that cannot be stored in time is not worth stalling for.

Each device has a budget (``ingest.budget``): reports and telemetry over its rate are dropped
at once, and events its reports would cause past its event rate are not recorded; both are
counted, with one event a minute per device saying so. Reports and samples about services the
device is not assigned are dropped (counted as ``unassigned``). The event log is trimmed to
``events_keep`` rows and ``events_max_age`` now and then.

One worker thread takes what is pending in batches and applies a batch in one transaction.
Once something is pending it lingers a moment (``linger_s``, 25 ms) for more to arrive before
it takes a batch: a transaction's fixed cost (the row loads, the commit) is then shared by
many messages instead of paid for each of the few that arrived since the last commit, which
is what capped ingest at a fraction of its batch rate while devices reported one by one.
A malformed message is dropped with an event; a batch that fails in the database is retried
message by message, so one bad message cannot take the others down with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.events import record_event, trim_events
from cloud_hub.ingest.budget import DeviceBudget, IngestLimits
from cloud_hub.ingest.messages import (
    MAX_PAYLOAD_BYTES,
    DeviceMessage,
    Online,
    Rejected,
    Reported,
    TelemetryMessage,
    parse_message,
)
from cloud_hub.ingest.rollups import Rollups
from cloud_hub.ingest.state import BatchView, UnknownDevice, apply_online, apply_reported, apply_telemetry
from cloud_hub.settings import HubSettings

log = logging.getLogger(__name__)

#: At most one "rejected" (or "throttled") event per device (or topic) in this many seconds.
REJECT_EVENT_INTERVAL_S = 60.0
#: How often the worker looks at deferred (over-budget) states while it has nothing else to do.
DEFERRED_CHECK_S = 0.25
#: How often the worker trims the event log.
TRIM_INTERVAL_S = 30.0
#: Messages applied in one transaction at most. A batch's fixed costs (its reads, the roll-up
#: of the services it moved, the commit) are shared by its messages: at 10,000 devices 2,000
#: apply about half again as fast as 500 did. The batch's device rows stay locked until it
#: commits (a fraction of a second), so a fleet change touching them waits that long at most.
BATCH_SIZE = 2000


@dataclass(frozen=True)
class EventRetention:
    keep: int = 100_000
    max_age: timedelta = timedelta(days=30)


def ingest_policy(settings: HubSettings) -> tuple[IngestLimits, EventRetention]:
    """The per-device budget and event retention a hub's settings ask for."""
    limits = IngestLimits(
        reports_per_min=settings.device_reports_per_min,
        reports_burst=max(10, int(settings.device_reports_per_min / 4)),
        telemetry_per_min=settings.device_telemetry_per_min,
        telemetry_burst=max(10, int(settings.device_telemetry_per_min / 4)),
        events_per_min=settings.device_events_per_min,
        events_burst=max(50, int(settings.device_events_per_min)),
    )
    return limits, EventRetention(settings.events_keep, timedelta(days=settings.events_max_age_days))


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
    throttled: int = 0  # messages over their device's rate, dropped on arrival
    events_suppressed: int = 0  # events over their device's budget, not recorded
    unassigned: int = 0  # module reports and samples about services the device does not run
    events_trimmed: int = 0


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
        batch_size: int = BATCH_SIZE,
        linger_s: float = 0.025,
        limits: IngestLimits | None = None,
        retention: EventRetention | None = None,
    ) -> None:
        """``limits`` None means no per-device budget (benchmarks); ``retention`` None never
        trims the event log."""
        self._sessions = sessions
        self._prefix = prefix
        self._keep = telemetry_keep
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._max_state = max_state_pending
        self._states: OrderedDict[str, _Raw] = OrderedDict()  # by topic: latest wins
        # By topic, latest wins: states over their device's budget, waiting for it to refill.
        # Bounded like _states, by the number of devices.
        self._deferred: dict[str, tuple[str, _Raw]] = {}
        self._telemetry: deque[_Raw] = deque(maxlen=max_telemetry_pending)
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_reject: dict[str, float] = {}
        self._budget = DeviceBudget(limits) if limits is not None else None
        self._retention = retention
        # device id → (desired-state generation, its services); only the worker thread uses it.
        self._assigned: dict[str, tuple[int, frozenset[str]]] = {}
        self._last_trim = -TRIM_INTERVAL_S
        self.stats = IngestStats()

    # --- producer side (MQTT thread) -------------------------------------------------------

    def submit(self, topic: str, payload: bytes, retained: bool) -> None:
        """Queue one message; returns at once whatever the state of the database."""
        # An oversized payload is refused when parsed; until then keep only enough of it to
        # tell, or a device flooding its telemetry topic with huge messages fills the memory.
        raw = _Raw(topic, bytes(payload[: MAX_PAYLOAD_BYTES + 1]), retained, utcnow())
        head, _, channel = topic.rpartition("/")
        device_id = head.rpartition("/")[2]
        with self._cond:
            self.stats.received += 1
            if channel == "telemetry":
                if not self._allowed(device_id, channel):
                    self.stats.throttled += 1
                    return
                if len(self._telemetry) == self._telemetry.maxlen:
                    self.stats.dropped_telemetry += 1
                self._telemetry.append(raw)
            elif topic in self._states:
                self.stats.coalesced += 1  # replacing a pending state costs nothing
                self._states[topic] = raw
            elif topic in self._deferred or not self._allowed(device_id, channel):
                # Over budget: the newest state waits until the device's bucket refills, so a
                # device that floods and then goes quiet still ends up with its last state.
                self.stats.throttled += 1
                if topic not in self._deferred and len(self._deferred) >= self._max_state:
                    self.stats.overflow += 1
                    return
                self._deferred[topic] = (device_id, raw)
            elif len(self._states) >= self._max_state:
                self.stats.overflow += 1
                return
            else:
                self._states[topic] = raw
            self._cond.notify()

    def _allowed(self, device_id: str, channel: str) -> bool:
        return self._budget is None or self._budget.allow_message(device_id, channel, time.monotonic())

    def _release_deferred(self) -> None:
        """Move deferred states whose device has budget again into the pending states."""
        for topic, (device_id, raw) in list(self._deferred.items()):
            # (A deferred topic is never also pending: submit defers only when it is not.)
            if self._allowed(device_id, "reported"):
                self._states[topic] = raw
                del self._deferred[topic]

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
            return len(self._states) + len(self._deferred) + len(self._telemetry) + (1 if self._busy else 0)

    def oldest_pending_at(self) -> datetime | None:
        """When the oldest message still waiting to be applied was received (the ingest lag)."""
        with self._cond:
            waiting = [*self._states.values(), *(raw for _, raw in self._deferred.values()), *self._telemetry]
            return min((raw.received_at for raw in waiting), default=None)

    def drain(self, timeout: float) -> bool:
        """Wait until everything submitted so far has been applied (True) or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._states or self._deferred or self._telemetry or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    # --- consumer side ---------------------------------------------------------------------

    def _take(self) -> list[_Raw] | None:
        with self._cond:
            while True:
                self._release_deferred()
                if self._states or self._telemetry or self._stop:
                    break
                self._cond.wait(DEFERRED_CHECK_S if self._deferred else None)
            if self._stop and not (self._states or self._telemetry):
                return None
            # Wait a moment for a fuller batch; the producer notifies on every message.
            until = time.monotonic() + self._linger_s
            while not self._stop and len(self._states) + len(self._telemetry) < self._batch_size:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
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
        self._record_refused()
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
        self._trim()

    def _apply(self, session: Session, messages: list[DeviceMessage]) -> int:
        """Apply messages in ``session``; returns how many came from unknown devices."""
        unknown = 0
        telemetry: list[TelemetryMessage] = []
        view = BatchView(
            session,
            (m.device_id for m in messages),
            allow_event=self._allow_event,
            assigned_cache=self._assigned,
        )
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
        rollups = Rollups.read(session, view.changed_services)
        view.write()
        rollups.record_changes(session)
        self.stats.unassigned += view.unassigned
        return unknown

    def _allow_event(self, device_id: str) -> bool:
        if self._budget is None:
            return True
        with self._cond:
            allowed = self._budget.allow_event(device_id, time.monotonic())
            if not allowed:
                self.stats.events_suppressed += 1
        return allowed

    def _record_refused(self) -> None:
        """One "throttled" event a minute per device that went over its budget."""
        if self._budget is None:
            return
        with self._cond:
            refused = self._budget.take_refused()
        now = time.monotonic()
        due: dict[str, int] = {}
        for device_id, count in refused.items():
            key = "throttled:" + device_id
            if now - self._last_reject.get(key, -REJECT_EVENT_INTERVAL_S) >= REJECT_EVENT_INTERVAL_S:
                self._last_reject[key] = now
                due[device_id] = count
            else:
                # Counted again with the next event for this device.
                with self._cond:
                    self._budget.refused[device_id] = self._budget.refused.get(device_id, 0) + count
        if not due:
            return
        try:
            with self._sessions.begin() as session:
                for device_id, count in due.items():
                    record_event(
                        session,
                        "throttled",
                        f"{device_id} sent more than its budget allows: {count} messages or events "
                        "held back or dropped (see the hub's ingest limits)",
                        device_id=device_id,
                    )
        except Exception:
            log.exception("could not record throttled-device events")

    def _trim(self) -> None:
        if self._retention is None or time.monotonic() - self._last_trim < TRIM_INTERVAL_S:
            return
        self._last_trim = time.monotonic()
        try:
            with self._sessions.begin() as session:
                self.stats.events_trimmed += trim_events(
                    session, keep=self._retention.keep, older_than=utcnow() - self._retention.max_age
                )
        except Exception:
            log.exception("could not trim the event log")

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
