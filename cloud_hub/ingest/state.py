"""Applying device messages to the database, and reading module states back.

Every apply function works inside the caller's transaction and records its events there, so
a state and the events that describe it commit together.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cloud_hub.events import record_event
from cloud_hub.fleet.tables import Device
from cloud_hub.ingest.changes import module_changes
from cloud_hub.ingest.messages import Online, Reported, TelemetryMessage
from cloud_hub.ingest.tables import DeviceReport, ModuleState, TelemetrySample
from manifests.reported import ModuleStatus


def _status(row: ModuleState) -> ModuleStatus:
    return ModuleStatus.model_validate(row.status)


def device_module_statuses(session: Session, device_id: str) -> list[ModuleStatus]:
    """Each module a device last reported, with its state (empty if it never reported)."""
    rows = session.scalars(
        select(ModuleState).where(ModuleState.device_id == device_id).order_by(ModuleState.service)
    )
    return [_status(r) for r in rows]


def service_statuses(session: Session, service: str) -> dict[str, ModuleStatus]:
    """The state of ``service`` on every device that reports it, by device id."""
    rows = session.scalars(select(ModuleState).where(ModuleState.service == service))
    return {r.device_id: _status(r) for r in rows}


def all_module_statuses(session: Session) -> dict[str, dict[str, ModuleStatus]]:
    """``{service: {device_id: status}}`` for every reported module (for overviews)."""
    out: dict[str, dict[str, ModuleStatus]] = {}
    for row in session.scalars(select(ModuleState)):
        out.setdefault(row.service, {})[row.device_id] = _status(row)
    return out


class UnknownDevice(Exception):
    """A message from a device id that is not enrolled (or was revoked)."""


class BatchView:
    """The rows a batch of messages touches, loaded with three queries instead of several per
    message (per-message lookups would each flush the session, which made ingest ~10x slower).
    """

    def __init__(self, session: Session, device_ids: Iterable[str]) -> None:
        ids = sorted(set(device_ids))
        self.session = session
        # FOR UPDATE, in id order, before anything else is read: two replicas that get the same
        # message (a redelivered QoS 1 message, or a broker without shared subscriptions) apply
        # it one after the other, and the second sees it is not news — no event is recorded
        # twice. (SQLite has no row locks; it serialises every writer, and runs one hub.)
        devices = select(Device).where(Device.id.in_(ids)).order_by(Device.id).with_for_update()
        self.devices = {d.id: d for d in session.scalars(devices)}
        self.reports = {
            r.device_id: r
            for r in session.scalars(select(DeviceReport).where(DeviceReport.device_id.in_(ids)))
        }
        self.modules: dict[str, dict[str, ModuleState]] = {}
        for row in session.scalars(select(ModuleState).where(ModuleState.device_id.in_(ids))):
            self.modules.setdefault(row.device_id, {})[row.service] = row

    def device(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None or device.revoked:
            raise UnknownDevice(device_id)
        return device


def _touch(device: Device, retained: bool, at_: datetime) -> None:
    # A retained message is redelivered history (e.g. on the hub's reconnect), not a sign of life.
    if not retained:
        device.last_seen = at_


def apply_reported(view: BatchView, msg: Reported) -> bool:
    """Store a newer reported state and its module states; False when it is not newer."""
    session = view.session
    device = view.device(msg.device_id)
    _touch(device, msg.retained, msg.received_at)
    state = msg.state
    current = view.reports.get(msg.device_id)
    if current is not None and current.reported_at >= state.reported_at:
        return False
    payload = state.model_dump(mode="json", by_alias=True)
    if current is None:
        current = DeviceReport(
            device_id=msg.device_id,
            payload=payload,
            reported_at=state.reported_at,
            agent_version=state.agent_version,
        )
        session.add(current)
        view.reports[msg.device_id] = current
    current.reported_at = state.reported_at
    current.received_at = msg.received_at
    current.applied_generation = state.applied_generation
    current.agent_version = state.agent_version
    current.last_error = state.last_error
    current.payload = payload
    device.agent_version = state.agent_version

    rows = view.modules.setdefault(msg.device_id, {})
    old = {svc: _status(r) for svc, r in rows.items()}
    for change in module_changes(msg.device_id, old, state.modules):
        record_event(session, change.kind, change.message, device_id=msg.device_id, service=change.service)
    reported = {m.service for m in state.modules}
    for svc in [svc for svc in rows if svc not in reported]:
        session.delete(rows.pop(svc))
    for status in state.modules:
        row = rows.get(status.service)
        if row is None:
            row = rows[status.service] = ModuleState(device_id=msg.device_id, service=status.service)
            session.add(row)
        row.state = status.state.value
        row.reason = status.reason
        row.manifest_digest = status.manifest_digest
        row.since = status.since
        row.updated_at = msg.received_at
        row.status = status.model_dump(mode="json")
    return True


def apply_online(view: BatchView, msg: Online) -> bool:
    """Set the device's online flag; True (and an event) when it changed."""
    device = view.device(msg.device_id)
    _touch(device, msg.retained, msg.received_at)
    if device.online == msg.online:
        return False
    device.online = msg.online
    if msg.online:
        record_event(view.session, "online", f"{msg.device_id} came online", device_id=msg.device_id)
    else:
        record_event(view.session, "offline", f"{msg.device_id} went offline", device_id=msg.device_id)
    return True


def apply_telemetry(view: BatchView, msgs: Iterable[TelemetryMessage], *, keep: int) -> int:
    """Store samples of enrolled devices and trim each device's history to its newest
    ``keep``; returns how many came from enrolled devices (the others are skipped)."""
    session = view.session
    known = 0
    devices: set[str] = set()
    msgs = list(msgs)
    # A sample that another replica already stored (same device, same timestamp) is skipped;
    # the device rows are locked (BatchView), so the check cannot race with that replica.
    rows = session.execute(
        select(TelemetrySample.device_id, TelemetrySample.ts).where(
            TelemetrySample.device_id.in_({m.device_id for m in msgs}),
            TelemetrySample.ts.in_({m.sample.ts for m in msgs}),
        )
    )
    held = {(device_id, ts) for device_id, ts in rows}
    for msg in msgs:
        try:
            device = view.device(msg.device_id)
        except UnknownDevice:
            continue
        _touch(device, msg.retained, msg.received_at)
        known += 1
        if (msg.device_id, msg.sample.ts) in held:
            continue
        held.add((msg.device_id, msg.sample.ts))
        session.add(
            TelemetrySample(
                device_id=msg.device_id,
                ts=msg.sample.ts,
                received_at=msg.received_at,
                payload=msg.sample.model_dump(mode="json", by_alias=True),
            )
        )
        devices.add(msg.device_id)
    session.flush()
    for device_id in devices:
        cutoff = session.scalar(
            select(TelemetrySample.id)
            .where(TelemetrySample.device_id == device_id)
            .order_by(TelemetrySample.id.desc())
            .offset(keep)
            .limit(1)
        )
        if cutoff is not None:
            session.execute(
                delete(TelemetrySample).where(
                    TelemetrySample.device_id == device_id, TelemetrySample.id <= cutoff
                )
            )
    return known
