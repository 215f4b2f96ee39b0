"""Read-only fleet queries for the dashboard: counts, filtered pages, one device, one service.

Everything is computed in SQL, so a page of 50 devices costs the same at 5,000 devices as at
five: the database filters, counts and pages, and Python only shapes the rows it returns.
The same statements run on SQLite and PostgreSQL (tags are read with SQLAlchemy's portable
JSON element access; no backend-specific operators).

States are named and rolled up by the rules of ``cloud_hub/rollup.py`` (its SQL renderings):
a service's state on a device, a device's state (the worst over the services assigned to it,
Pending included; Idle with none), a service's state (from its counts by state). Call these
inside one ``Sessions.snapshot()``: a device's state joins what the deployments target now.

A **service's devices** are found by turning its target into SQL (tags or ids), which is the
same rule ``Target.includes`` applies when the fleet is planned.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    and_,
    case,
    cast,
    false,
    func,
    literal,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.orm import Session, object_session

from cloud_hub.fleet.tables import Deployment, Device, ServiceChange
from cloud_hub.fleet.targeting import Target, parse_tag
from cloud_hub.ingest.tables import ModuleState
from cloud_hub.rollouts.tables import STAGING
from cloud_hub.rollouts.tables import Rollout as StagedRollout
from cloud_hub.rollup import (
    PRECEDENCE,
    DeviceState,
    ReportColumns,
    rank_sql,
    service_state_of_counts,
    state_of_rank_sql,
    state_on_device,
    state_on_device_sql,
)
from manifests.errors import ConfigError
from manifests.reported import ModuleStatus
from manifests.states import ServiceState, StateOnDevice

#: A page never holds more rows than this, whatever the client asks for.
MAX_PAGE = 200
#: More tag filters than this in one query is a client bug, not a search.
MAX_TAG_FILTERS = 8
MAX_SEARCH_CHARS = 64
#: The offset of the last page reachable; beyond it a query is refused (cheap to check, and
#: a deep offset on a fleet far larger than this would be a scan anyway).
MAX_OFFSET = 1_000_000


#: The words for a service's state on one device (``StateOnDevice``), worst first.
DEVICE_SERVICE_STATES: tuple[str, ...] = tuple(s.value for s in PRECEDENCE)


# --- filters (pure) ----------------------------------------------------------------------------


def parse_tag_filter(text: str) -> tuple[str, str]:
    """``"site:berlin"`` (or ``"site=berlin"``) → ``("site", "berlin")``.

    A tag key never holds ':' or '=', so the first of them separates key from value (a value
    may hold ':').
    """
    cut = min((i for i in (text.find(":"), text.find("=")) if i >= 0), default=-1)
    if cut < 0:
        raise ConfigError(f"tag filter {text!r}: expected key:value, e.g. site:berlin")
    return parse_tag(f"{text[:cut]}={text[cut + 1:]}", what="tag filter")


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices a listing shows; every field narrows (they combine with AND)."""

    q: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    state: DeviceState | None = None
    online: bool | None = None

    @classmethod
    def parse(
        cls, *, q: str | None, tags: Sequence[str], state: str | None, online: bool | None
    ) -> DeviceFilter:
        """Validate raw query parameters; a bad one is a :class:`ConfigError` naming it."""
        if q is not None:
            q = q.strip()
            if len(q) > MAX_SEARCH_CHARS:
                raise ConfigError(f"q: at most {MAX_SEARCH_CHARS} characters")
            if any(not ch.isprintable() for ch in q):
                raise ConfigError("q: control characters are not allowed")
        if len(tags) > MAX_TAG_FILTERS:
            raise ConfigError(f"tag: at most {MAX_TAG_FILTERS} tag filters")
        wanted: dict[str, str] = {}
        for item in tags:
            key, value = parse_tag_filter(item)
            if wanted.get(key, value) != value:
                raise ConfigError(f"tag: key {key!r} is given twice with different values")
            wanted[key] = value
        parsed_state = None
        if state is not None:
            try:
                parsed_state = DeviceState(state)
            except ValueError:
                choices = ", ".join(s.value for s in DeviceState)
                raise ConfigError(f"state {state!r}: expected one of {choices}") from None
        return cls(q=q or None, tags=wanted, state=parsed_state, online=online)


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ConfigError(f"limit: between 1 and {MAX_PAGE}")
    if not 0 <= offset <= MAX_OFFSET:
        raise ConfigError(f"offset: between 0 and {MAX_OFFSET}")


# --- SQL building blocks -------------------------------------------------------------------------


def _tags_match(tags: Mapping[str, str]) -> list[ColumnElement[bool]]:
    # ``tags[key].as_string()`` is JSON_EXTRACT on SQLite and ->> on PostgreSQL: a missing key is
    # NULL, which equals nothing, as in ``selector_matches``.
    return [Device.tags[key].as_string() == value for key, value in sorted(tags.items())]


def target_clause(target: Target) -> ColumnElement[bool]:
    """The devices a service's target includes, as a WHERE clause (see ``Target.includes``)."""
    if target.devices is not None:
        return Device.id.in_(target.devices)
    assert target.selector is not None
    return and_(*_tags_match(target.selector))


def _report_columns(current: ColumnElement[Any]) -> ReportColumns:
    """The rules' inputs from ``ModuleState`` (outer-joined) for a service whose current
    manifest digest is ``current``."""
    return ReportColumns(
        reported=ModuleState.device_id.is_not(None),
        state=ModuleState.state.expression,
        manifest_digest=ModuleState.manifest_digest.expression,
        serving_digest=ModuleState.status["serving_digest"].as_string(),
        current=current,
        generation=ModuleState.status["generation"].as_integer(),
        changed=_changed_generation(),
    )


def _changed_generation() -> ColumnElement[Any]:
    """The generation at which the outer-joined report's service last changed on its device."""
    return (
        select(ServiceChange.generation)
        .where(ServiceChange.device_id == ModuleState.device_id, ServiceChange.service == ModuleState.service)
        .correlate(ModuleState)
        .scalar_subquery()
    )


def _assigned(deployments: Sequence[Deployment], only: str | None) -> Any:
    """Subquery: (device, service, current digest) for every service targeting a device (the
    device ``only``, when given).

    The targets are JSON the database cannot match portably, so each deployment's becomes its
    own WHERE clause (a hub has tens of services, not thousands).
    """
    parts = [
        select(
            Device.id.label("device_id"),
            cast(literal(d.name), String).label("service"),
            cast(literal(d.manifest_digest), String).label("current"),
        ).where(target_clause(Target.model_validate(d.target)), *([Device.id == only] if only else []))
        for d in deployments
    ]
    if not parts:
        nothing = cast(literal(None), String)
        empty = select(Device.id.label("device_id"), nothing.label("service"), nothing.label("current"))
        parts = [empty.where(false())]
    return (union_all(*parts) if len(parts) > 1 else parts[0]).subquery("assigned")


def _worst_rank_per_device(deployments: Sequence[Deployment], only: str | None) -> Any:
    """Subquery: each assigned device's worst rank over its services' states."""
    assigned = _assigned(deployments, only)
    state = state_on_device_sql(_report_columns(assigned.c.current))
    return (
        select(assigned.c.device_id.label("device_id"), func.min(rank_sql(state)).label("rank"))
        .select_from(assigned)
        .outerjoin(
            ModuleState,
            and_(ModuleState.device_id == assigned.c.device_id, ModuleState.service == assigned.c.service),
        )
        .group_by(assigned.c.device_id)
        .subquery("worst")
    )


@dataclass(frozen=True)
class DeviceQuery:
    """Active devices joined to what their state is computed from."""

    worst: Any
    state: ColumnElement[str]

    @classmethod
    def make(cls, session: Session, *, only: str | None = None) -> DeviceQuery:
        """Reads the deployments (their targets and digests) in ``session``; ``only``: the
        one device whose state is wanted (the others' is not computed)."""
        worst = _worst_rank_per_device(list(session.scalars(select(Deployment))), only)
        return cls(worst, state_of_rank_sql(worst.c.rank))

    def select(self, *columns: Any, state: bool = True) -> Select[Any]:
        """Active devices; ``state=False`` leaves out the join their state needs (a count that
        does not filter by state costs a fraction of one that does)."""
        query = select(*columns).select_from(Device)
        if state:
            query = query.outerjoin(self.worst, self.worst.c.device_id == Device.id)
        return query.where(Device.revoked.is_(False))

    def filtered(self, query: Select[Any], f: DeviceFilter) -> Select[Any]:
        if f.q is not None:
            # Ids and tag text (keys and values): the dashboard's one search box.
            query = query.where(
                or_(
                    Device.id.icontains(f.q, autoescape=True),
                    func.lower(cast(Device.tags, String)).contains(f.q.lower(), autoescape=True),
                )
            )
        if f.tags:
            query = query.where(*_tags_match(f.tags))
        if f.state is not None:
            query = query.where(self.state == f.state.value)
        if f.online is not None:
            query = query.where(Device.online.is_(true() if f.online else false()))
        return query


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRow:
    id: str
    tags: dict[str, str]
    online: bool
    last_seen: datetime | None
    agent_version: str | None
    state: DeviceState


@dataclass(frozen=True)
class DevicePage:
    total: int
    offset: int
    limit: int
    devices: list[DeviceRow]


@dataclass(frozen=True)
class FleetCounts:
    total: int
    online: int
    by_state: dict[str, int]

    @property
    def offline(self) -> int:
        return self.total - self.online


@dataclass(frozen=True)
class ServiceDeviceRow:
    device_id: str
    online: bool
    state: StateOnDevice
    reason: str | None
    manifest_digest: str | None
    status: dict[str, Any] | None


@dataclass(frozen=True)
class Rollout:
    """How far a service's current version has got over its targeted devices."""

    total: int
    #: targeted devices by ``StateOnDevice`` word
    by_state: dict[str, int]

    @property
    def done(self) -> int:
        """Devices where the current version serves, Healthy."""
        return self.by_state[StateOnDevice.HEALTHY.value]

    @property
    def state(self) -> ServiceState:
        return service_state_of_counts(self.by_state)

    def plus(self, other: Rollout) -> Rollout:
        """The counts of two disjoint sets of the service's devices together."""
        names = self.by_state.keys() | other.by_state.keys()
        return Rollout(
            total=self.total + other.total,
            by_state={n: self.by_state.get(n, 0) + other.by_state.get(n, 0) for n in names},
        )


# --- queries -------------------------------------------------------------------------------------


def fleet_counts(session: Session) -> FleetCounts:
    """Active devices: how many, how many online, how many in each device state."""
    dq = DeviceQuery.make(session)
    online_here = func.sum(case((Device.online.is_(True), 1), else_=0))
    rows = session.execute(dq.select(dq.state, func.count(), online_here).group_by(dq.state))
    by_state = {s.value: 0 for s in DeviceState}
    total = online = 0
    for state, n, n_online in rows:
        by_state[state] = int(n)
        total += int(n)
        online += int(n_online or 0)
    return FleetCounts(total=total, online=online, by_state=by_state)


def device_page(session: Session, f: DeviceFilter, *, limit: int, offset: int) -> DevicePage:
    """One page of devices (by id) matching ``f``, and how many match in all."""
    check_page(limit, offset)
    dq = DeviceQuery.make(session)
    total = session.scalar(dq.filtered(dq.select(func.count(), state=f.state is not None), f)) or 0
    rows = session.execute(
        dq.filtered(
            dq.select(
                Device.id, Device.tags, Device.online, Device.last_seen, Device.agent_version, dq.state
            ),
            f,
        )
        .order_by(Device.id)
        .limit(limit)
        .offset(offset)
    )
    devices = [
        DeviceRow(
            id=id_,
            tags=dict(tags or {}),
            online=bool(online),
            last_seen=last_seen,
            agent_version=agent,
            state=DeviceState(state),
        )
        for id_, tags, online, last_seen, agent, state in rows
    ]
    return DevicePage(total=int(total), offset=offset, limit=limit, devices=devices)


def device_state(session: Session, device_id: str) -> DeviceState:
    dq = DeviceQuery.make(session, only=device_id)
    state = session.scalar(dq.select(dq.state).where(Device.id == device_id))
    return DeviceState(state) if state is not None else DeviceState.IDLE


def _current_digest(deployment: Deployment) -> ColumnElement[Any]:
    """The digest a device's report is judged against. Under a rollout still staging devices
    (cloud_hub.rollouts) a device runs its wave's version: the previous one counts as current
    for a device that reports it, so the devices not yet released are not 'Transitioning'. (A
    device just released and still on the previous version shows Healthy until it reports the
    new one: a wave's exact count is the rollout's own, ``service rollout NAME status``.)"""
    session = object_session(deployment)
    staged = session.get(StagedRollout, deployment.name) if session is not None else None
    if staged is None or staged.state not in STAGING or staged.to_digest != deployment.manifest_digest:
        return literal(deployment.manifest_digest)
    return case(
        (ModuleState.manifest_digest == staged.from_digest, literal(staged.from_digest)),
        else_=literal(deployment.manifest_digest),
    )


def _service_state_column(deployment: Deployment) -> ColumnElement[str]:
    return state_on_device_sql(_report_columns(_current_digest(deployment)))


def _service_devices(deployment: Deployment, *columns: Any) -> Select[Any]:
    target = Target.model_validate(deployment.target)
    return (
        select(*columns)
        .select_from(Device)
        .outerjoin(
            ModuleState, and_(ModuleState.device_id == Device.id, ModuleState.service == deployment.name)
        )
        .where(Device.revoked.is_(False), target_clause(target))
    )


def rollout(
    session: Session,
    deployment: Deployment,
    *,
    only: Collection[str] | None = None,
    excluding: Collection[str] = (),
) -> Rollout:
    """Counts of the service's targeted devices by their state for it (of the devices
    ``only`` names, and not of those ``excluding`` names, when given)."""
    state = _service_state_column(deployment)
    query = _service_devices(deployment, state, func.count()).group_by(state)
    if only is not None:
        query = query.where(Device.id.in_(sorted(only)))
    if excluding:
        query = query.where(Device.id.not_in(sorted(excluding)))
    rows = session.execute(query)
    by_state = dict.fromkeys(DEVICE_SERVICE_STATES, 0)
    for name, n in rows:
        by_state[name] = by_state.get(name, 0) + int(n)
    return Rollout(total=sum(by_state.values()), by_state=by_state)


def _current_of(deployment: Deployment, reported: str | None) -> str:
    """:func:`_current_digest` for one report, in Python."""
    session = object_session(deployment)
    staged = session.get(StagedRollout, deployment.name) if session is not None else None
    if staged is not None and staged.state in STAGING and reported == staged.from_digest:
        return staged.from_digest
    return deployment.manifest_digest


def _reason(
    reason: str | None, status: dict[str, Any] | None, current: str, changed: int | None
) -> str | None:
    """The rules' reason for a row (the SQL gave its state); a stored status this hub cannot
    read keeps the device's own reason."""
    try:
        report = ModuleStatus.model_validate(status) if status is not None else None
    except ValidationError:
        return reason
    return state_on_device(report, current, changed).reason


def service_devices_page(
    session: Session,
    deployment: Deployment,
    *,
    state: str | None,
    limit: int,
    offset: int,
) -> tuple[int, list[ServiceDeviceRow]]:
    """One page (by device id) of the service's targeted devices, optionally in one state."""
    check_page(limit, offset)
    if state is not None and state not in DEVICE_SERVICE_STATES:
        raise ConfigError(f"state {state!r}: expected one of {', '.join(DEVICE_SERVICE_STATES)}")
    here = _service_state_column(deployment)
    count = _service_devices(deployment, func.count())
    rows_q = _service_devices(
        deployment,
        Device.id,
        Device.online,
        here,
        ModuleState.reason,
        ModuleState.manifest_digest,
        ModuleState.status,
        _changed_generation(),
    )
    if state is not None:
        count, rows_q = count.where(here == state), rows_q.where(here == state)
    total = int(session.scalar(count) or 0)
    rows = session.execute(rows_q.order_by(Device.id).limit(limit).offset(offset))
    out = [
        ServiceDeviceRow(
            device_id=id_,
            online=bool(online),
            state=StateOnDevice(st),
            reason=_reason(reason, status, _current_of(deployment, digest), changed),
            manifest_digest=digest,
            status=status,
        )
        for id_, online, st, reason, digest, status, changed in rows
    ]
    return total, out
