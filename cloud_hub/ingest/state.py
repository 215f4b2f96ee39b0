"""Applying device messages to the database, and reading module states back.

Every apply function works inside the caller's transaction and records its events there, so
a state and the events that describe it commit together.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from cloud_hub.db.base import Base, utcnow
from cloud_hub.events import Event, NewEvent
from cloud_hub.fleet.tables import Device, DeviceDesired
from cloud_hub.ingest.changes import ModuleFacts, module_changes
from cloud_hub.ingest.messages import Online, Reported, TelemetryMessage
from cloud_hub.ingest.tables import DeviceReport, ModuleState, TelemetrySample
from cloud_hub.webhooks.outbox import record_events
from manifests.reported import ModuleStatus, ReportedState
from manifests.states import ServiceState

#: The event a device's ``link_problem`` becomes (e.g. two agents with one device's credentials).
LINK_PROBLEM_EVENT = "link-problem"
#: A device's link problem is recorded once in this long, however many reports repeat it (both
#: agents of a pair report it, and their retained reports replace each other).
LINK_PROBLEM_QUIET = timedelta(hours=1)


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
    # Columns, not ORM rows: a roll-up over thousands of devices spent most of its time
    # building (and tracking) an object per row that it only reads once.
    rows = session.execute(
        select(ModuleState.device_id, ModuleState.status).where(ModuleState.service == service)
    )
    return {device_id: ModuleStatus.model_validate(status) for device_id, status in rows}


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


@dataclass
class _DeviceRow:
    """The columns of a device's row that ingest reads and writes."""

    revoked: bool
    online: bool
    last_seen: datetime | None
    agent_version: str | None
    changed: dict[str, Any] = field(default_factory=dict)

    def set(self, **values: Any) -> None:
        for key, value in values.items():
            if getattr(self, key) != value:
                setattr(self, key, value)
                self.changed[key] = value


@dataclass(frozen=True)
class _StoredModule:
    """What :func:`module_changes` compares of a stored module state (read as columns: no
    JSON parse, no model per row)."""

    service: str
    state: ServiceState
    reason: str | None
    manifest_digest: str | None


@dataclass
class _ModuleRow:
    """A module state: what the next report is compared against (stored, or applied earlier in
    this batch), whether the database has its row (update) or not (insert), and what to write."""

    old: ModuleFacts
    stored: bool
    values: dict[str, Any] | None = None


class BatchView:
    """The rows a batch of messages touches, read with four queries and written with a few
    ``executemany`` statements at the end (:meth:`write`), never an ORM object per row.

    Per-message lookups would each flush the session (ingest was ~10x slower that way), and
    loading, tracking and flushing ORM objects for three tables per message still cost most of
    a batch's time; plain columns in and bulk statements out keep the same decisions.

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
        # FOR UPDATE, in id order, before anything else is read: two replicas that get the same
        # message (a redelivered QoS 1 message, or a broker without shared subscriptions) apply
        # it one after the other, and the second sees it is not news — no event is recorded
        # twice. (SQLite has no row locks; it serialises every writer, and runs one hub.)
        devices = (
            select(Device.id, Device.revoked, Device.online, Device.last_seen, Device.agent_version)
            .where(Device.id.in_(ids))
            .order_by(Device.id)
            .with_for_update()
        )
        self.devices = {row[0]: _DeviceRow(*row[1:]) for row in session.execute(devices)}
        self.assigned = self._load_assigned(ids, {} if assigned_cache is None else assigned_cache)
        reports = select(DeviceReport.device_id, DeviceReport.reported_at).where(
            DeviceReport.device_id.in_(ids)
        )
        self.reported_at: dict[str, datetime] = {d: at for d, at in session.execute(reports)}
        self._reports_stored = frozenset(self.reported_at)  # rows to update; the others are new
        self._reports_new: dict[str, dict[str, Any]] = {}
        self._reports_changed: dict[str, dict[str, Any]] = {}
        self.modules: dict[str, dict[str, _ModuleRow]] = {}
        stored = select(
            ModuleState.device_id, ModuleState.service, ModuleState.state, ModuleState.reason,
            ModuleState.manifest_digest,
        ).where(ModuleState.device_id.in_(ids))  # fmt: skip
        for device_id, service, state, reason, digest in session.execute(stored):
            old = _StoredModule(service, ServiceState(state), reason, digest)
            self.modules.setdefault(device_id, {})[service] = _ModuleRow(old, stored=True)
        self.modules_gone: list[tuple[str, str]] = []
        #: service → the devices of this batch where its state changed (its roll-up may move)
        self.changed_services: dict[str, set[str]] = {}
        self._link_problems_noted: set[str] = set()
        #: the batch's events, stored by :meth:`write` in one statement
        self.events: list[NewEvent] = []

    def event(self, kind: str, message: str, *, device_id: str, service: str | None = None) -> None:
        """Record an event with the batch (written by :meth:`write`, in this transaction)."""
        self.events.append(NewEvent(kind, message, device_id, service))

    def link_problem_is_news(self, device_id: str, at_: datetime) -> bool:
        """Whether a link problem of ``device_id`` is to be recorded: none was in this batch,
        nor in the events of the last :data:`LINK_PROBLEM_QUIET` (a query only for the rare
        report that names one)."""
        if device_id in self._link_problems_noted:
            return False
        self._link_problems_noted.add(device_id)
        recent = (
            select(Event.id)
            .where(Event.device_id == device_id, Event.kind == LINK_PROBLEM_EVENT)
            .where(Event.at > at_ - LINK_PROBLEM_QUIET)
            .limit(1)
        )
        with self.session.no_autoflush:
            return self.session.scalar(recent) is None

    def device(self, device_id: str) -> _DeviceRow:
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

    def store_report(self, device_id: str, values: dict[str, Any]) -> None:
        """The device's newest report, to be written by :meth:`write` (the last one wins)."""
        (self._reports_changed if device_id in self._reports_stored else self._reports_new)[device_id] = (
            values
        )
        self.reported_at[device_id] = values["reported_at"]

    def write(self) -> None:
        """Send every change the batch decided, a statement per table and kind (executemany),
        and the batch's events in one INSERT."""
        session = self.session
        devices = [{"id": d, **row.changed} for d, row in self.devices.items() if row.changed]
        for keys in {frozenset(r) for r in devices}:  # one statement per set of changed columns
            _update_rows(session, Device, ("id",), [r for r in devices if frozenset(r) == keys])
        if self._reports_new:
            _insert_rows(session, DeviceReport, list(self._reports_new.values()))
        if self._reports_changed:
            _update_rows(session, DeviceReport, ("device_id",), list(self._reports_changed.values()))
        for device_id, service in self.modules_gone:
            session.execute(
                delete(ModuleState).where(ModuleState.device_id == device_id, ModuleState.service == service)
            )
        fresh: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        for rows in self.modules.values():
            for row in rows.values():
                if row.values is not None:
                    (changed if row.stored else fresh).append(row.values)
        if fresh:
            _insert_rows(session, ModuleState, fresh)
        if changed:
            _update_rows(session, ModuleState, ("device_id", "service"), changed)
        record_events(session, self.events, at=utcnow())
        self.events = []


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


def _insert_rows(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> None:
    """One executemany INSERT on the model's table (Core: no ORM bulk bookkeeping per row)."""
    session.execute(insert(_table(model)), rows)


def _update_rows(
    session: Session, model: type[Base], key: tuple[str, ...], rows: list[dict[str, Any]]
) -> None:
    """One executemany UPDATE of the rows' other columns (the SET clause follows the first
    row's), each row found by its ``key`` columns."""
    table = _table(model)
    # A WHERE clause's bound names must differ from the columns the SET clause binds.
    where = [table.c[k] == bindparam(f"key_{k}") for k in key]
    params = [
        {**{f"key_{k}": r[k] for k in key}, **{k: v for k, v in r.items() if k not in key}} for r in rows
    ]
    session.execute(update(table).where(*where), params)


def _touch(device: _DeviceRow, retained: bool, at_: datetime) -> None:
    # A retained message is redelivered history (e.g. on the hub's reconnect), not a sign of life.
    if not retained:
        device.set(last_seen=at_)


def apply_reported(view: BatchView, msg: Reported) -> bool:
    """Store a newer reported state and its module states; False when it is not newer."""
    device = view.device(msg.device_id)
    _touch(device, msg.retained, msg.received_at)
    state = _trusted_part(view, msg)
    current = view.reported_at.get(msg.device_id)
    if current is not None and current >= state.reported_at:
        return False
    view.store_report(
        msg.device_id,
        {
            "device_id": msg.device_id,
            "reported_at": state.reported_at,
            "received_at": msg.received_at,
            "applied_generation": state.applied_generation,
            "agent_version": state.agent_version,
            "last_error": state.last_error,
            "payload": state.model_dump(mode="json", by_alias=True),
        },
    )
    device.set(agent_version=state.agent_version)
    if (
        state.link_problem is not None
        and view.link_problem_is_news(msg.device_id, msg.received_at)
        and view.allow_event(msg.device_id)
    ):
        view.event(LINK_PROBLEM_EVENT, f"{msg.device_id}: {state.link_problem}", device_id=msg.device_id)

    rows = view.modules.setdefault(msg.device_id, {})
    old = {svc: r.old for svc, r in rows.items()}
    for change in module_changes(msg.device_id, old, state.modules):
        view.changed_services.setdefault(change.service, set()).add(msg.device_id)
        if view.allow_event(msg.device_id):
            view.event(change.kind, change.message, device_id=msg.device_id, service=change.service)
    reported = {m.service for m in state.modules}
    for svc in [svc for svc in rows if svc not in reported]:
        if rows.pop(svc).stored:
            view.modules_gone.append((msg.device_id, svc))
    for status in state.modules:
        row = rows.get(status.service)
        if row is None:
            row = rows[status.service] = _ModuleRow(status, stored=False)
        row.old = status
        row.values = {
            "device_id": msg.device_id,
            "service": status.service,
            "state": status.state.value,
            "reason": status.reason,
            "manifest_digest": status.manifest_digest,
            "since": status.since,
            "updated_at": msg.received_at,
            "status": status.model_dump(mode="json"),
        }
    return True


def _trusted_part(view: BatchView, msg: Reported) -> ReportedState:
    """The report with device times clamped to the hub's clock and only assigned services."""
    state = msg.state
    assigned = view.services_of(msg.device_id)
    modules = [_clamped(m, msg.received_at) for m in state.modules if m.service in assigned]
    view.unassigned += len(state.modules) - len(modules)
    reported_at = clamp_to_hub_clock(state.reported_at, msg.received_at)
    unchanged = len(modules) == len(state.modules) and all(
        a is b for a, b in zip(modules, state.modules, strict=True)
    )
    if unchanged and reported_at == state.reported_at and state.reported_at.tzinfo is not None:
        return state  # the usual case: nothing to clamp or drop, so no copy
    return state.model_copy(update={"reported_at": reported_at, "modules": modules})


def _clamped(status: ModuleStatus, received_at: datetime) -> ModuleStatus:
    since = clamp_to_hub_clock(status.since, received_at)
    if since == status.since and status.since.tzinfo is not None:
        return status
    return status.model_copy(update={"since": since})


def apply_online(view: BatchView, msg: Online) -> bool:
    """Set the device's online flag; True (and an event) when it changed."""
    device = view.device(msg.device_id)
    _touch(device, msg.retained, msg.received_at)
    if device.online == msg.online:
        return False
    device.set(online=msg.online)
    if msg.online:
        view.event("online", f"{msg.device_id} came online", device_id=msg.device_id)
    else:
        view.event("offline", f"{msg.device_id} went offline", device_id=msg.device_id)
    return True


def apply_telemetry(view: BatchView, msgs: Iterable[TelemetryMessage], *, keep: int) -> int:
    """Store samples of enrolled devices and trim each device's history to its newest
    ``keep``; returns how many came from enrolled devices (the others are skipped).

    A batch costs the same few statements however many devices it names: one SELECT for the
    samples already stored, one executemany INSERT and one DELETE that trims every device of
    the batch (an ORM object, a cutoff query and a DELETE per device made a sample cost about
    two reported states)."""
    session = view.session
    known = 0
    # Device clocks may run ahead: a sample is stored at the hub's time at the latest.
    stamped = [(m, clamp_to_hub_clock(m.sample.ts, m.received_at)) for m in msgs]
    # A sample that another replica already stored (same device, same timestamp) is skipped;
    # the device rows are locked (BatchView), so the check cannot race with that replica.
    rows = session.execute(
        select(TelemetrySample.device_id, TelemetrySample.ts).where(
            TelemetrySample.device_id.in_({m.device_id for m, _ in stamped}),
            TelemetrySample.ts.in_({ts for _, ts in stamped}),
        )
    )
    held = {(device_id, ts) for device_id, ts in rows}
    fresh: list[dict[str, Any]] = []
    for msg, ts in stamped:
        try:
            device = view.device(msg.device_id)
        except UnknownDevice:
            continue
        _touch(device, msg.retained, msg.received_at)
        known += 1
        if (msg.device_id, ts) in held:
            continue
        held.add((msg.device_id, ts))
        assigned = view.services_of(msg.device_id)
        modules = [m for m in msg.sample.modules if m.service in assigned]
        view.unassigned += len(msg.sample.modules) - len(modules)
        sample = msg.sample.model_copy(update={"ts": ts, "modules": modules})
        fresh.append(
            {
                "device_id": msg.device_id,
                "ts": ts,
                "received_at": msg.received_at,
                "payload": sample.model_dump(mode="json", by_alias=True),
            }
        )
    if fresh:
        _insert_rows(session, TelemetrySample, fresh)
        _trim_telemetry(session, {r["device_id"] for r in fresh}, keep)
    return known


def _trim_telemetry(session: Session, device_ids: set[str], keep: int) -> None:
    """One DELETE of every sample of ``device_ids`` older than the device's ``keep`` newest
    (newest by id: ids rise in insertion order, and a device's samples are inserted under its
    row lock), so the statement count does not grow with the devices in the batch.

    Each device's cutoff, the id of its ``keep`` + 1-th newest sample, is one backward walk of
    the (device_id, id) index that stops there; then only the rows at or below it are read.
    (A ``row_number()`` window over the devices' samples ranks and sorts every row they hold:
    4-5x slower on SQLite, up to 2x on PostgreSQL, for a 2,000-device batch.) Trimming only
    past a slack would read less, but let readers see more than ``keep`` samples, which the
    setting promises they do not."""
    table = _table(TelemetrySample)
    devices = _table(Device)
    older = table.alias("older")
    cutoff = (
        select(older.c.id)
        .where(older.c.device_id == devices.c.id)
        .order_by(older.c.id.desc())
        .offset(keep)
        .limit(1)
        .scalar_subquery()
    )
    # Driven by the devices' rows (locked by BatchView): one cutoff per device, NULL while it
    # holds no more than ``keep``. PostgreSQL must compute them once: inlined, its planner ran
    # the cutoff query once per sample row (seconds for one batch). MATERIALIZED: PostgreSQL
    # 12+ (the hub needs 13); SQLite, measured, plans the statement well without the hint.
    cutoffs = (
        select(devices.c.id.label("device_id"), cutoff.label("cutoff"))
        .where(devices.c.id.in_(sorted(device_ids)))
        .cte("cutoffs")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    doomed = select(table.c.id).join(
        cutoffs, and_(table.c.device_id == cutoffs.c.device_id, table.c.id <= cutoffs.c.cutoff)
    )
    session.execute(delete(table).where(table.c.id.in_(doomed)))
