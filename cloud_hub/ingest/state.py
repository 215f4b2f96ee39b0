"""Applying device messages to the database, and reading module states back.

Every apply function works inside the caller's transaction and records its events there, so
a state and the events that describe it commit together.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cloud_hub.events import record_event
from cloud_hub.fleet.tables import Device, DeviceDesired
from cloud_hub.ingest.changes import module_changes
from cloud_hub.ingest.messages import Online, Reported, TelemetryMessage
from cloud_hub.ingest.tables import DeviceReport, ModuleState, TelemetrySample
from manifests.reported import ModuleStatus, ReportedState


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


def assigned_services(payload: bytes | None) -> frozenset[str]:
    """The services in a stored desired-state envelope (bytes the hub wrote and signed)."""
    if payload is None:
        return frozenset()
    signed = json.loads(payload)["signed"]
    return frozenset(m["service"] for m in signed.get("modules", ()))


def clamp_to_hub_clock(ts: datetime, received_at: datetime) -> datetime:
    """Device clocks are not trusted: a time ahead of the hub's is taken as the time the hub
    received the message (a report dated 9999 would otherwise win over every later one)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)  # the contracts' times are UTC
    return min(ts, received_at)


class BatchView:
    """The rows a batch of messages touches, loaded with four queries instead of several per
    message (per-message lookups would each flush the session, which made ingest ~10x slower).

    ``allow_event(device_id)`` says whether a device's budget still allows an event; refused
    events are counted by whoever owns the budget. ``unassigned`` counts module reports and
    samples dropped because they named a service the device's desired state does not list.
    """

    def __init__(
        self,
        session: Session,
        device_ids: Iterable[str],
        *,
        allow_event: Callable[[str], bool] | None = None,
        assigned_cache: dict[str, tuple[int, frozenset[str]]] | None = None,
    ) -> None:
        ids = sorted(set(device_ids))
        self.session = session
        self.allow_event = allow_event or (lambda _device_id: True)
        self.unassigned = 0
        self.devices = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(ids)))}
        self.assigned = self._load_assigned(ids, {} if assigned_cache is None else assigned_cache)
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

    def _load_assigned(
        self, ids: list[str], cache: dict[str, tuple[int, frozenset[str]]]
    ) -> dict[str, frozenset[str]]:
        """Services per device, parsing a stored desired state only when its generation is
        not the one ``cache`` holds (the generation rises with every change)."""
        rows = self.session.execute(
            select(DeviceDesired.device_id, DeviceDesired.generation).where(DeviceDesired.device_id.in_(ids))
        )
        generations: dict[str, int] = {device_id: gen for device_id, gen in rows}
        stale = [d for d, gen in generations.items() if cache.get(d, (-1,))[0] != gen]
        if stale:
            payloads = self.session.execute(
                select(DeviceDesired.device_id, DeviceDesired.generation, DeviceDesired.payload).where(
                    DeviceDesired.device_id.in_(stale)
                )
            )
            for device_id, gen, payload in payloads:
                cache[device_id] = (gen, assigned_services(payload))
        return {d: cache[d][1] for d in generations if d in cache}

    def services_of(self, device_id: str) -> frozenset[str]:
        return self.assigned.get(device_id, frozenset())


def _touch(device: Device, retained: bool, at_: datetime) -> None:
    # A retained message is redelivered history (e.g. on the hub's reconnect), not a sign of life.
    if not retained:
        device.last_seen = at_


def apply_reported(view: BatchView, msg: Reported) -> bool:
    """Store a newer reported state and its module states; False when it is not newer."""
    session = view.session
    device = view.device(msg.device_id)
    _touch(device, msg.retained, msg.received_at)
    state = _trusted_part(view, msg)
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
        if view.allow_event(msg.device_id):
            record_event(
                session, change.kind, change.message, device_id=msg.device_id, service=change.service
            )
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


def _trusted_part(view: BatchView, msg: Reported) -> ReportedState:
    """The report with device times clamped to the hub's clock and only assigned services."""
    state = msg.state
    assigned = view.services_of(msg.device_id)
    modules = [
        m.model_copy(update={"since": clamp_to_hub_clock(m.since, msg.received_at)})
        for m in state.modules
        if m.service in assigned
    ]
    view.unassigned += len(state.modules) - len(modules)
    return state.model_copy(
        update={"reported_at": clamp_to_hub_clock(state.reported_at, msg.received_at), "modules": modules}
    )


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
    ``keep``; returns how many were stored (samples of unknown devices are skipped)."""
    session = view.session
    stored = 0
    devices: set[str] = set()
    for msg in msgs:
        try:
            device = view.device(msg.device_id)
        except UnknownDevice:
            continue
        _touch(device, msg.retained, msg.received_at)
        assigned = view.services_of(msg.device_id)
        modules = [m for m in msg.sample.modules if m.service in assigned]
        view.unassigned += len(msg.sample.modules) - len(modules)
        sample = msg.sample.model_copy(
            update={"ts": clamp_to_hub_clock(msg.sample.ts, msg.received_at), "modules": modules}
        )
        session.add(
            TelemetrySample(
                device_id=msg.device_id,
                ts=sample.ts,
                received_at=msg.received_at,
                payload=sample.model_dump(mode="json", by_alias=True),
            )
        )
        devices.add(msg.device_id)
        stored += 1
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
    return stored
