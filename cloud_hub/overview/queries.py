"""Read-only fleet queries for the dashboard: counts, filtered pages, one device, one service.

Everything is computed in SQL, so a page of 50 devices costs the same at 5,000 devices as at
five: the database filters, counts and pages, and Python only shapes the rows it returns.
The same statements run on SQLite and PostgreSQL (tags are read with SQLAlchemy's portable
JSON element access; no backend-specific operators).

A **device's state** is the worst (``ingest.rollup.PRECEDENCE``) of the states it reports for
the services deployed now; a module still reporting another manifest than its service's
current one counts as Transitioning (as in ``fleet.status``). A device that has services
assigned but has reported none of them is **Pending**; one with no services is **Idle**.

A **service's devices** are found by turning its target into SQL (tags or ids), which is the
same rule ``Target.includes`` applies when the fleet is planned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

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
)
from sqlalchemy.orm import Session

from cloud_hub.fleet.plan import assignments_digest
from cloud_hub.fleet.tables import Deployment, Device, DeviceDesired
from cloud_hub.fleet.targeting import Target, parse_tag
from cloud_hub.ingest.rollup import PRECEDENCE, rollup_states
from cloud_hub.ingest.tables import ModuleState
from manifests.errors import ConfigError
from manifests.states import ServiceState

#: A page never holds more rows than this, whatever the client asks for.
MAX_PAGE = 200
#: More tag filters than this in one query is a client bug, not a search.
MAX_TAG_FILTERS = 8
MAX_SEARCH_CHARS = 64
#: The offset of the last page reachable; beyond it a query is refused (cheap to check, and
#: a deep offset on a fleet far larger than this would be a scan anyway).
MAX_OFFSET = 1_000_000


class DeviceState(StrEnum):
    """A device's rolled-up state: the five service states plus Pending and Idle."""

    FAILED = "Failed"
    UNSCHEDULABLE = "Unschedulable"
    UNHEALTHY = "Unhealthy"
    TRANSITIONING = "Transitioning"
    HEALTHY = "Healthy"
    PENDING = "Pending"  # services assigned, none reported yet
    IDLE = "Idle"  # no services assigned


#: A service's state on one device; PENDING when the device has not reported it yet.
DEVICE_SERVICE_STATES: tuple[str, ...] = (*(s.value for s in PRECEDENCE), DeviceState.PENDING.value)

_RANK = {s.value: i for i, s in enumerate(PRECEDENCE)}
_TRANSITIONING_RANK = _RANK[ServiceState.TRANSITIONING.value]
#: The modules digest of a desired state with no modules (a device with nothing to run).
_NOTHING = assignments_digest([])


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


def _module_state_here() -> ColumnElement[str]:
    """A module row's state for the service as deployed now (needs Deployment joined)."""
    stale = and_(
        ModuleState.manifest_digest.is_not(None), ModuleState.manifest_digest != Deployment.manifest_digest
    )
    return case((stale, literal(ServiceState.TRANSITIONING.value)), else_=ModuleState.state)


def _worst_rank_per_device() -> Any:
    """Subquery: each reporting device's worst rank over its current services' states."""
    rank = case(_RANK, value=_module_state_here(), else_=_TRANSITIONING_RANK)
    return (
        select(ModuleState.device_id.label("device_id"), func.min(rank).label("rank"))
        .join(Deployment, Deployment.name == ModuleState.service)
        .group_by(ModuleState.device_id)
        .subquery("worst")
    )


def _device_state_column(worst: Any) -> ColumnElement[str]:
    has_services = and_(DeviceDesired.payload.is_not(None), DeviceDesired.modules_digest != _NOTHING)
    by_rank = {i: s.value for i, s in enumerate(PRECEDENCE)}
    return case(
        *((worst.c.rank == i, literal(name)) for i, name in by_rank.items()),
        (has_services, literal(DeviceState.PENDING.value)),
        else_=literal(DeviceState.IDLE.value),
    )


@dataclass(frozen=True)
class DeviceQuery:
    """Active devices joined to what their state is computed from."""

    worst: Any
    state: ColumnElement[str]

    @classmethod
    def make(cls) -> DeviceQuery:
        worst = _worst_rank_per_device()
        return cls(worst, _device_state_column(worst))

    def select(self, *columns: Any) -> Select[Any]:
        return (
            select(*columns)
            .select_from(Device)
            .outerjoin(self.worst, self.worst.c.device_id == Device.id)
            .outerjoin(DeviceDesired, DeviceDesired.device_id == Device.id)
            .where(Device.revoked.is_(False))
        )

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
    state: str  # one of DEVICE_SERVICE_STATES
    reason: str | None
    manifest_digest: str | None
    status: dict[str, Any] | None


@dataclass(frozen=True)
class Rollout:
    """How far a service's current version has got over its targeted devices."""

    total: int
    by_state: dict[str, int]
    #: devices reporting the current manifest Healthy
    done: int

    @property
    def state(self) -> ServiceState:
        states: list[ServiceState | None] = []
        for name, n in self.by_state.items():
            if n:
                states.append(None if name == DeviceState.PENDING.value else ServiceState(name))
        return rollup_states(states)


# --- queries -------------------------------------------------------------------------------------


def fleet_counts(session: Session) -> FleetCounts:
    """Active devices: how many, how many online, how many in each device state."""
    dq = DeviceQuery.make()
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
    dq = DeviceQuery.make()
    total = session.scalar(dq.filtered(dq.select(func.count()), f)) or 0
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
    dq = DeviceQuery.make()
    state = session.scalar(dq.select(dq.state).where(Device.id == device_id))
    return DeviceState(state) if state is not None else DeviceState.IDLE


def _service_state_column(deployment: Deployment) -> ColumnElement[str]:
    stale = and_(
        ModuleState.manifest_digest.is_not(None), ModuleState.manifest_digest != deployment.manifest_digest
    )
    return case(
        (ModuleState.device_id.is_(None), literal(DeviceState.PENDING.value)),
        (stale, literal(ServiceState.TRANSITIONING.value)),
        else_=ModuleState.state,
    )


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


def rollout(session: Session, deployment: Deployment) -> Rollout:
    """Counts of the service's targeted devices by their state for it."""
    state = _service_state_column(deployment)
    rows = session.execute(_service_devices(deployment, state, func.count()).group_by(state))
    by_state = dict.fromkeys(DEVICE_SERVICE_STATES, 0)
    for name, n in rows:
        by_state[name] = by_state.get(name, 0) + int(n)
    done = session.scalar(
        _service_devices(deployment, func.count()).where(
            ModuleState.state == ServiceState.HEALTHY.value,
            ModuleState.manifest_digest == deployment.manifest_digest,
        )
    )
    return Rollout(total=sum(by_state.values()), by_state=by_state, done=int(done or 0))


def _reason(state: str, reason: str | None, digest: str | None, current: str) -> str | None:
    if state == DeviceState.PENDING.value:
        return "not reported yet"
    if digest is not None and digest != current:
        return "still running an earlier version"
    return reason


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
    )
    if state is not None:
        count, rows_q = count.where(here == state), rows_q.where(here == state)
    total = int(session.scalar(count) or 0)
    rows = session.execute(rows_q.order_by(Device.id).limit(limit).offset(offset))
    out = [
        ServiceDeviceRow(
            device_id=id_,
            online=bool(online),
            state=st,
            reason=_reason(st, reason, digest, deployment.manifest_digest),
            manifest_digest=digest,
            status=status,
        )
        for id_, online, st, reason, digest, status in rows
    ]
    return total, out
