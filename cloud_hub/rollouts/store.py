"""Rollouts in the database: starting one with a deploy, observing its wave, applying decisions.

Every function that changes a rollout runs inside a fleet change
(:meth:`cloud_hub.fleet.changes.FleetChanges.change`): the fleet lock serialises it with every
other change, the plan that follows re-issues the desired state of each device whose wave
moved, and :func:`apply` acts only if the row is still at the ``step`` the decision was made
on, so a decision two replicas both made is applied once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.events import record_event
from cloud_hub.fleet.plan import DeviceView, Plan
from cloud_hub.fleet.tables import Deployment, Device
from cloud_hub.fleet.targeting import Target
from cloud_hub.ingest.tables import ModuleState, TelemetrySample
from cloud_hub.rollouts.engine import Decision, Halt, Progress, Promote, StartBake, Wait, WaveHealth
from cloud_hub.rollouts.gates import Cohort, cohort_of
from cloud_hub.rollouts.staging import staged_view
from cloud_hub.rollouts.tables import (
    ABORTED,
    COMPLETED,
    HALTED,
    ROLLED_BACK,
    RUNNING,
    STAGING,
    Rollout,
)
from cloud_hub.rollouts.waves import pick_thresholds, wave_sizes
from manifests.errors import ConfigError
from manifests.reported import Telemetry
from manifests.rollout import RolloutSpec, parse_gate
from manifests.states import ServiceState

SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Limits:
    """The hub's rollout settings a start needs (HubSettings.rollout_*)."""

    health_timeout_s: float = 300.0
    max_spread_values: int = 1000
    max_running: int = 100


@dataclass(frozen=True)
class VersionRef:
    module: str
    version: str
    digest: str


def previous_version(session: Session, row: Deployment | None) -> VersionRef | None:
    """What devices not yet released keep running: during a rollout, its previous version (the
    one the whole fleet last ran); otherwise what the deployment runs now."""
    if row is None:
        return None
    rollout = session.get(Rollout, row.name)
    if rollout is not None and rollout.state in STAGING:
        return VersionRef(rollout.from_module, rollout.from_version, rollout.from_digest)
    return VersionRef(row.module_name, row.module_version, row.manifest_digest)


def end_staging(session: Session, service: str, why: str) -> None:
    """A deploy without waves replaces a rollout still staging devices: every device gets it."""
    rollout = session.get(Rollout, service)
    if rollout is not None and rollout.state in STAGING:
        rollout.state, rollout.reason, rollout.step = SUPERSEDED, why, rollout.step + 1
        rollout.updated_at = utcnow()


def targeted_devices(session: Session, target: Target) -> dict[str, dict[str, str]]:
    rows = session.execute(select(Device.id, Device.tags).where(Device.revoked.is_(False)))
    return {d: dict(tags or {}) for d, tags in rows if target.includes(d, dict(tags or {}))}


def start_rollout(
    session: Session,
    *,
    service: str,
    previous: VersionRef,
    to: VersionRef,
    spec: RolloutSpec,
    target: Target,
    limits: Limits,
) -> Rollout:
    """Stage the deployment's new version (``to``) over the waves of ``spec``; the first wave is
    released at once. Refuses (nothing stored) a spread tag with too many values or one rollout
    too many."""
    running = session.scalar(
        select(func.count())
        .select_from(Rollout)
        .where(Rollout.state.in_(STAGING), Rollout.service != service)
    )
    if (running or 0) >= limits.max_running:
        raise Conflict(
            f"{running} rollouts are running or halted, the hub's bound (rollout_max_running); "
            "finish, promote or abort one first"
        )
    devices = targeted_devices(session, target)
    if spec.spread_by is not None:
        values = {tags.get(spec.spread_by, "") for tags in devices.values()}
        if len(values) > limits.max_spread_values:
            raise ConfigError(
                f"spread-by {spec.spread_by}: the targeted devices have {len(values)} values of it, "
                f"more than the hub's bound of {limits.max_spread_values} (rollout_max_spread_values)"
            )
    rollout_id = uuid.uuid4().hex
    now = utcnow()
    row = session.get(Rollout, service)
    if row is None:
        row = Rollout(service=service, step=0)
        session.add(row)
    row.rollout_id = rollout_id
    row.state = RUNNING
    row.wave = 0
    row.waves = list(spec.waves)
    row.bake_s = spec.bake_s
    row.gates = [g.text() for g in spec.gates]
    row.on_failure = spec.on_failure
    row.spread_by = spec.spread_by
    row.health_timeout_s = spec.health_timeout_s or limits.health_timeout_s
    row.thresholds = pick_thresholds(rollout_id, devices, spec.waves, spec.spread_by)
    row.from_module, row.from_version, row.from_digest = previous.module, previous.version, previous.digest
    row.to_version, row.to_digest = to.version, to.digest
    row.wave_started_at = now
    row.bake_started_at = None
    row.reason = None
    row.step = (row.step or 0) + 1
    row.created_at = row.updated_at = now
    first = wave_sizes(len(devices), spec.waves)[0] if devices else 0
    record_event(
        session,
        "rollout.wave-started",
        f"service {service}: rollout of {to.version} (from {previous.version}) started: "
        f"wave 1 of {len(spec.waves)} ({first} devices)",
        service=service,
    )
    return row


def progress_of(row: Rollout) -> Progress:
    return Progress(
        wave=row.wave,
        waves=len(row.waves),
        wave_started_at=row.wave_started_at,
        bake_started_at=row.bake_started_at,
        bake_s=row.bake_s,
        health_timeout_s=row.health_timeout_s,
        gates=tuple(parse_gate(g) for g in row.gates),
        previous=row.from_version,
    )


@dataclass(frozen=True)
class Observation:
    health: WaveHealth
    released: frozenset[str]  # devices assigned the new version and serving it
    previous: frozenset[str]  # devices serving the previous version


def assigned(plan: Plan, service: str, digest: str) -> list[str]:
    """The devices ``plan`` gives ``service`` at ``digest``."""
    return sorted(
        d
        for d, mods in plan.items()
        if any(m.service == service and m.manifest_digest == digest for m in mods)
    )


def released(session: Session, row: Rollout) -> list[str]:
    """The devices the rollout gives the new version now (the plan's answer, without building
    every device's assignments: the loop asks every few seconds)."""
    deployment = session.get(Deployment, row.service)
    if deployment is None:
        return []
    staged = staged_view(row, {}) if row.state in STAGING else None
    if staged is None and deployment.manifest_digest != row.to_digest:
        return []  # rolled back, aborted, or replaced by another version
    target = Target.model_validate(deployment.target)
    out = []
    for device_id, tags in session.execute(select(Device.id, Device.tags).where(Device.revoked.is_(False))):
        view = DeviceView(device_id, dict(tags or {}))
        if target.includes(device_id, view.tags) and (staged is None or not staged.keeps_previous(view)):
            out.append(device_id)
    return sorted(out)


@dataclass(frozen=True)
class _Reported:
    state: str
    digest: str | None
    serving: str | None
    since: datetime
    reason: str | None


def _reported(session: Session, service: str) -> dict[str, _Reported]:
    """The service's state on each device that reports it: the columns the loop needs, read
    without validating every device's whole status again (the loop asks every few seconds;
    ingest validated each report when it stored it)."""
    rows = session.execute(
        select(
            ModuleState.device_id,
            ModuleState.state,
            ModuleState.manifest_digest,
            ModuleState.status["serving_digest"].as_string(),
            ModuleState.since,
            ModuleState.reason,
        ).where(ModuleState.service == service)
    )
    return {
        d: _Reported(state, digest, serving, since, reason)
        for d, state, digest, serving, since, reason in rows
    }


def observe(session: Session, row: Rollout) -> Observation:
    """How the released waves' devices report the service now."""
    assigned_new = released(session, row)
    statuses = _reported(session, row.service)
    online = dict(session.execute(select(Device.id, Device.online).where(Device.revoked.is_(False))).all())
    healthy = offline = 0
    failed: list[tuple[str, str]] = []
    waiting: list[str] = []
    for device_id in assigned_new:
        status = statuses.get(device_id)
        if (
            status is not None
            and status.digest == row.to_digest
            and status.state == ServiceState.FAILED.value
            # A failure from before the wave (re)started was judged already: after a resume,
            # a device still failing is one not Healthy within the health timeout.
            and status.since >= row.wave_started_at
        ):
            failed.append((device_id, status.reason or "no reason given"))
        elif (
            status is not None
            and status.state == ServiceState.HEALTHY.value
            and status.digest == row.to_digest
            and status.serving == row.to_digest
        ):
            healthy += 1
        elif not online.get(device_id, False):
            offline += 1
        else:
            waiting.append(device_id)
    serving_new = frozenset(d for d, s in statuses.items() if s.serving == row.to_digest)
    serving_old = frozenset(d for d, s in statuses.items() if s.serving == row.from_digest)
    health = WaveHealth(len(assigned_new), healthy, offline, failed, waiting)
    return Observation(health, serving_new & frozenset(assigned_new), serving_old)


def cohorts(
    session: Session, row: Rollout, seen: Observation, since: datetime, max_samples: int
) -> tuple[Cohort, Cohort]:
    """(new version's cohort, previous version's cohort) from the telemetry received since."""
    payloads: Sequence[dict[str, Any]] = session.scalars(
        select(TelemetrySample.payload)
        .where(TelemetrySample.received_at >= since)
        .order_by(TelemetrySample.received_at.desc())
        .limit(max_samples)
    ).all()
    samples = []
    for payload in payloads:
        try:
            samples.append(Telemetry.model_validate(payload))
        except ValidationError:
            continue  # a row an older hub stored unchecked: no reading from it
    return cohort_of(samples, row.service, seen.released), cohort_of(samples, row.service, seen.previous)


def _revert(session: Session, row: Rollout) -> None:
    deployment = session.get(Deployment, row.service)
    if deployment is not None:
        deployment.module_name = row.from_module
        deployment.module_version = row.from_version
        deployment.manifest_digest = row.from_digest
        deployment.updated_at = utcnow()


def _wave_devices(row: Rollout, count: int) -> str:
    return f"wave {row.wave + 1} ({count} device{'s' if count != 1 else ''})"


def apply(session: Session, service: str, step: int, decision: Decision) -> str | None:
    """Apply ``decision`` if the rollout is still running at ``step``; the event kind recorded
    (None: nothing was done, another replica or the operator moved it first)."""
    row = session.get(Rollout, service)
    if row is None or row.step != step or row.state != RUNNING or isinstance(decision, Wait):
        return None
    now = utcnow()
    row.step += 1
    row.updated_at = now
    if isinstance(decision, StartBake):
        row.bake_started_at = decision.at
        return "rollout.baking"
    if isinstance(decision, Promote):
        return _promote(session, row, now, by="its gates")
    assert isinstance(decision, Halt)
    return _halt(session, row, decision.reason)


def _promote(session: Session, row: Rollout, now: datetime, *, by: str) -> str:
    if row.wave + 1 >= len(row.waves):
        row.state, row.reason = COMPLETED, None
        record_event(
            session,
            "rollout.completed",
            f"service {row.service}: rollout of {row.to_version} completed: every device runs it "
            f"({len(row.waves)} waves)",
            service=row.service,
        )
        return "rollout.completed"
    record_event(
        session,
        "rollout.promoted",
        f"service {row.service}: wave {row.wave + 1} of {len(row.waves)} of {row.to_version} passed {by}",
        service=row.service,
    )
    row.wave += 1
    row.state = RUNNING
    row.wave_started_at, row.bake_started_at, row.reason = now, None, None
    record_event(
        session,
        "rollout.wave-started",
        f"service {row.service}: wave {row.wave + 1} of {len(row.waves)} of {row.to_version} started "
        f"({row.waves[row.wave]:g}% of the devices)",
        service=row.service,
    )
    return "rollout.promoted"


def _halt(session: Session, row: Rollout, reason: str) -> str:
    row.reason = reason
    if row.on_failure == "rollback":
        row.state = ROLLED_BACK
        _revert(session, row)
        tail = f"; rolled back to {row.from_version}"
    else:
        row.state = HALTED
        tail = "; the released waves keep it until 'edgepack service rollout resume|promote|abort'"
    record_event(
        session,
        "rollout.halted",
        f"service {row.service}: rollout of {row.to_version} halted: {reason}{tail}",
        service=row.service,
    )
    return "rollout.halted"


ACTIONS = ("resume", "promote", "abort")


def operate(session: Session, service: str, action: str) -> Rollout:
    """The operator's ``resume`` (a halted rollout judges its wave again), ``promote`` (release
    the next wave now, whatever the bake and gates say) or ``abort`` (every device back on the
    previous version)."""
    row = session.get(Rollout, service)
    if row is None:
        raise NotFound(f"service {service} has no rollout; deploy with --waves to start one")
    if action not in ACTIONS:
        raise ConfigError(f"rollout action {action[:40]!r}: use resume, promote or abort")
    if row.state not in STAGING:
        done = {
            ROLLED_BACK: f"it was rolled back to {row.from_version}; "
            f"deploy {row.to_version} again to start a new rollout",
            COMPLETED: "it completed",
            ABORTED: f"it was aborted; deploy {row.to_version} again to start a new rollout",
            SUPERSEDED: "a later deploy replaced it",
        }.get(row.state, row.state)
        raise Conflict(f"service {service}: the rollout of {row.to_version} cannot {action}: {done}")
    now = utcnow()
    row.step += 1
    row.updated_at = now
    if action == "resume":
        if row.state != HALTED:
            raise Conflict(f"service {service}: the rollout of {row.to_version} is running, not halted")
        row.state, row.reason = RUNNING, None
        row.wave_started_at, row.bake_started_at = now, None
        record_event(
            session,
            "rollout.wave-started",
            f"service {service}: rollout of {row.to_version} resumed: wave {row.wave + 1} is judged again",
            service=service,
        )
    elif action == "promote":
        _promote(session, row, now, by="the operator's promote")
    else:
        row.state, row.reason = ABORTED, "aborted by the operator"
        _revert(session, row)
        record_event(
            session,
            "rollout.aborted",
            f"service {service}: rollout of {row.to_version} aborted; "
            f"every device back on {row.from_version}",
            service=service,
        )
    return row


def status_line(row: Rollout, released: int) -> str:
    """One line for ``service show``, the SDK and the dashboard."""
    waves = len(row.waves)
    if row.state == RUNNING:
        doing = "waiting for its devices to be Healthy" if row.bake_started_at is None else "baking"
        if row.bake_started_at is not None:
            left = max(0.0, row.bake_s - (utcnow() - row.bake_started_at).total_seconds())
            doing = f"baking, {left:.0f}s left"
        return f"Rolling out {row.to_version}: {_wave_devices(row, released)} of {waves} waves: {doing}"
    if row.state == HALTED:
        return f"Halted: {row.reason}"
    if row.state == ROLLED_BACK:
        return f"Halted: {row.reason}; rolled back to {row.from_version}"
    if row.state == COMPLETED:
        return f"Completed: {row.to_version} on every device ({waves} waves)"
    if row.state == ABORTED:
        return f"Aborted: every device back on {row.from_version}"
    return f"Replaced: {row.reason}"


def active_services(session: Session) -> list[tuple[str, int]]:
    """(service, step) of every running rollout."""
    return [
        (s, step)
        for s, step in session.execute(select(Rollout.service, Rollout.step).where(Rollout.state == RUNNING))
    ]
