"""The service roll-up's one home: its words, its rules, and their Python and SQL renderings.

Words (``manifests.states``):

- a **service on a device** is a :class:`StateOnDevice`: the state the device reports, or
  **Pending** while the device is assigned the service and has not reported it yet;
- a **service** is a :class:`ServiceState` (Azure ML's five): the worst of its devices'
  states, Pending counting as Transitioning (still being deployed), and Unschedulable when it
  targets no device (nowhere to run it: calling that Healthy would let ``service wait``
  succeed for a selector that matches nothing);
- a **device** is a :class:`DeviceState`: the worst of its assigned services' states,
  Pending included, and **Idle** when nothing is assigned to it.

The rules that turn one report into a :class:`StateOnDevice` (:data:`RULES`) and the order
"worst first" (:data:`PRECEDENCE`) are data. :func:`state_on_device` and :func:`worst` apply
them in Python (the deployment and device APIs behind ``service show``, ``device show`` and
the SDK); :func:`state_on_device_sql`,
:func:`rank_sql` and :func:`state_of_rank_sql` render the very same tables as SQL ``CASE``
expressions (the dashboard's paged queries in ``overview/queries.py``), so the two cannot
drift; ``tests/hub/test_rollup_renderings.py`` checks both against the same rows on SQLite
and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, case, literal, not_

from manifests.reported import ModuleStatus
from manifests.states import ServiceState, StateOnDevice

#: Worst first. Pending ranks after Transitioning (both are "not there yet", and a device
#: that moves is further along than one that has not spoken) and before Healthy (a service
#: is not Healthy anywhere it has not reported).
PRECEDENCE: tuple[StateOnDevice, ...] = (
    StateOnDevice.FAILED,
    StateOnDevice.UNSCHEDULABLE,
    StateOnDevice.UNHEALTHY,
    StateOnDevice.TRANSITIONING,
    StateOnDevice.PENDING,
    StateOnDevice.HEALTHY,
)
RANK: Mapping[str, int] = {s.value: i for i, s in enumerate(PRECEDENCE)}


class DeviceState(StrEnum):
    """A device's rolled-up state: a :class:`StateOnDevice`, or Idle."""

    FAILED = StateOnDevice.FAILED.value
    UNSCHEDULABLE = StateOnDevice.UNSCHEDULABLE.value
    UNHEALTHY = StateOnDevice.UNHEALTHY.value
    TRANSITIONING = StateOnDevice.TRANSITIONING.value
    HEALTHY = StateOnDevice.HEALTHY.value
    PENDING = StateOnDevice.PENDING.value  # a service not reported yet, none worse, none moving
    IDLE = "Idle"  # no services assigned


# --- the rules for one service on one device -----------------------------------------------------


@dataclass(frozen=True)
class NotReported:
    """The device has not reported the service."""


@dataclass(frozen=True)
class Differs:
    """The report names a digest for ``field`` and it is not the service's current one."""

    field: Literal["manifest_digest", "serving_digest"]


@dataclass(frozen=True)
class Behind:
    """The report is about a desired-state generation before the one at which the service's
    assignment on the device last changed: it describes what was there before the change (a
    settings-only change keeps the digest, so :class:`Differs` cannot tell)."""


@dataclass(frozen=True)
class Reports:
    """The device reports this state."""

    state: ServiceState


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Condition, ...]


Condition = NotReported | Differs | Behind | Reports | AllOf


@dataclass(frozen=True)
class Rule:
    """When ``when`` holds (the first rule that does wins), the service is ``state`` there;
    ``reason`` is said instead of the device's own (``{serving}`` names what serves)."""

    when: Condition
    state: StateOnDevice
    reason: str


#: Checked in order; a report no rule matches is taken as it is (its state and reason).
RULES: tuple[Rule, ...] = (
    Rule(NotReported(), StateOnDevice.PENDING, "not reported yet"),
    # A device still reporting an older module version of the service is moving towards the
    # new one, whatever state the old version is in.
    Rule(Differs("manifest_digest"), StateOnDevice.TRANSITIONING, "still running an earlier version"),
    # The same version with other settings: the report predates the change.
    Rule(Behind(), StateOnDevice.TRANSITIONING, "has not applied the latest change yet"),
    # Healthy means the deployed version serves: Healthy while another version serves is the
    # switch not done yet. (Failed with the old version serving stays Failed: a rollback.)
    Rule(
        AllOf((Reports(ServiceState.HEALTHY), Differs("serving_digest"))),
        StateOnDevice.TRANSITIONING,
        "{serving} serves, not the deployed version yet",
    ),
)


@dataclass(frozen=True)
class Verdict:
    state: StateOnDevice
    reason: str | None = None


def _holds(when: Condition, status: ModuleStatus | None, current: str, changed: int | None) -> bool:
    match when:
        case NotReported():
            return status is None
        case Differs(field=name):
            value = getattr(status, name) if status is not None else None
            return value is not None and value != current
        case Behind():
            generation = status.generation if status is not None else None
            return generation is not None and changed is not None and generation < changed
        case Reports(state=state):
            return status is not None and status.state is state
        case AllOf(parts=parts):
            return all(_holds(p, status, current, changed) for p in parts)


def state_on_device(status: ModuleStatus | None, current: str, changed: int | None = None) -> Verdict:
    """A service's state on one device from its report (None: not reported), for the service as
    deployed now (``current``: its manifest digest) and last changed on the device at desired
    generation ``changed`` (None: not known, before the hub kept it)."""
    for rule in RULES:
        if _holds(rule.when, status, current, changed):
            serving = ""
            if status is not None:
                version = status.serving_version
                serving = f"version {version}" if version else str(status.serving_digest)
            return Verdict(rule.state, rule.reason.format(serving=serving))
    assert status is not None  # NotReported is the first rule
    return Verdict(StateOnDevice.of(status.state), status.reason)


@dataclass(frozen=True)
class ReportColumns:
    """What the rules read, as SQL: a report's columns (outer-joined: NULL when there is
    none) and the service's current manifest digest."""

    reported: ColumnElement[bool]
    state: ColumnElement[str]
    manifest_digest: ColumnElement[Any]
    serving_digest: ColumnElement[Any]
    current: ColumnElement[Any]
    #: the generation the report is about, and the one the service last changed at (NULL: not
    #: known)
    generation: ColumnElement[Any]
    changed: ColumnElement[Any]


def _sql(when: Condition, cols: ReportColumns) -> ColumnElement[bool]:
    match when:
        case NotReported():
            return not_(cols.reported)
        case Differs(field=name):
            column = cols.manifest_digest if name == "manifest_digest" else cols.serving_digest
            return and_(column.is_not(None), column != cols.current)
        case Behind():
            generation, changed = cols.generation, cols.changed
            return and_(generation.is_not(None), changed.is_not(None), generation < changed)
        case Reports(state=state):
            return cols.state == state.value
        case AllOf(parts=parts):
            return and_(*(_sql(p, cols) for p in parts))


def state_on_device_sql(cols: ReportColumns) -> ColumnElement[str]:
    """:func:`state_on_device`'s state as a SQL expression (a CASE over :data:`RULES`)."""
    return case(
        *((_sql(rule.when, cols), literal(rule.state.value)) for rule in RULES),
        else_=cols.state,
    )


# --- rolling up --------------------------------------------------------------------------------------


def worst(states: Iterable[StateOnDevice]) -> StateOnDevice | None:
    """The worst of ``states`` by :data:`PRECEDENCE`; None when there are none."""
    return min(states, key=lambda s: RANK[s.value], default=None)


def service_state(states: Iterable[StateOnDevice]) -> ServiceState:
    """A service's state from its state on each targeted device."""
    found = worst(states)
    if found is None:
        return ServiceState.UNSCHEDULABLE
    if found is StateOnDevice.PENDING:
        return ServiceState.TRANSITIONING
    return ServiceState(found.value)


def service_state_of_counts(by_state: Mapping[str, int]) -> ServiceState:
    """:func:`service_state` from counts of devices by :class:`StateOnDevice` word."""
    return service_state(StateOnDevice(name) for name, n in by_state.items() if n)


def device_state(states: Iterable[StateOnDevice]) -> DeviceState:
    """A device's state from its state for each service assigned to it."""
    found = worst(states)
    return DeviceState.IDLE if found is None else DeviceState(found.value)


def rank_sql(state: ColumnElement[str]) -> ColumnElement[int]:
    """A :class:`StateOnDevice` word's place in :data:`PRECEDENCE` (to take the worst with
    ``MIN``); a word that is none of them ranks as Transitioning."""
    return case(dict(RANK), value=state, else_=RANK[StateOnDevice.TRANSITIONING.value])


def state_of_rank_sql(rank: ColumnElement[Any]) -> ColumnElement[str]:
    """The :class:`DeviceState` of a device's worst rank (NULL: nothing assigned, Idle)."""
    return case(
        *((rank == i, literal(s.value)) for i, s in enumerate(PRECEDENCE)),
        else_=literal(DeviceState.IDLE.value),
    )
