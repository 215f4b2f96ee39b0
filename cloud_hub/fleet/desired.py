"""Issuing signed desired states: the database and broker edge around ``fleet.plan``.

Every change to what devices should run goes through :func:`change_fleet`:

1. take the fleet lock (first statement of the transaction, see ``fleet.tables``);
2. plan the fleet, apply the change, plan again;
3. refuse the change if any device would get two services on one port (nothing is stored);
4. for each device whose assignments changed, allocate the next generation in SQL, sign the
   full desired state with the hub key and store the envelope bytes;
5. after the commit, publish the stored bytes retained on each device's ``desired`` topic.

Publishing happens after the commit so that a device is never told about a state the database
might still roll back. To keep a slower publisher from overwriting a newer retained message
with an older one, publishes are serialised per hub process and always send what the database
holds *now*, not what this request computed. (Across replicas a stale retained message can
still win a race; agents refuse older generations and also poll over HTTP, so they converge.)

A desired state expires (``settings.desired_ttl_s``). :func:`renew_expiring` re-issues those
with under half their lifetime left; a device fetching its state over HTTP triggers it for
itself, and a hub should also call it periodically for devices that only listen on MQTT.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud_hub.context import HubContext
from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict
from cloud_hub.events import record_event
from cloud_hub.fleet.plan import (
    DeploymentView,
    DeviceView,
    Plan,
    assignments_digest,
    changed_devices,
    desired_payload,
    plan_fleet,
    port_conflicts,
)
from cloud_hub.fleet.tables import Deployment, Device, DeviceDesired, FleetLock
from cloud_hub.fleet.targeting import Target
from manifests.desired import DeploymentSettings, DesiredState
from manifests.errors import FetchError
from manifests.signing import envelope_bytes, parse_envelope, sign_payload

log = logging.getLogger(__name__)

R = TypeVar("R")


def take_fleet_lock(session: Session) -> None:
    session.execute(update(FleetLock).where(FleetLock.id == 1).values(version=FleetLock.version + 1))


def deployment_view(row: Deployment) -> DeploymentView:
    return DeploymentView(
        name=row.name,
        module=row.module_name,
        version=row.module_version,
        manifest_digest=row.manifest_digest,
        settings=DeploymentSettings.model_validate(row.settings),
        target=Target.model_validate(row.target),
    )


def issued_digests(session: Session) -> dict[str, str | None]:
    rows = session.execute(
        select(DeviceDesired.device_id, DeviceDesired.modules_digest).where(
            DeviceDesired.payload.is_not(None)
        )
    )
    return {device_id: digest for device_id, digest in rows}


def current_plan(session: Session) -> Plan:
    devices = [
        DeviceView(id=d.id, tags=dict(d.tags or {}))
        for d in session.scalars(select(Device).where(Device.revoked.is_(False)))
    ]
    deployments = [deployment_view(r) for r in session.scalars(select(Deployment))]
    return plan_fleet(devices, deployments)


@dataclass
class FleetChange(Generic[R]):
    """What a committed change did: the mutation's result and the generations it issued."""

    result: R
    issued: dict[str, int] = field(default_factory=dict)
    published: bool | None = None  # None: no broker configured
    publish_errors: list[str] = field(default_factory=list)


def issue_desired(
    session: Session, ctx: HubContext, plan: Plan, device_ids: Sequence[str], *, now: datetime
) -> dict[str, int]:
    """Sign and store a new desired state for each device; returns the new generations."""
    if not device_ids:
        return {}
    ids = sorted(set(device_ids))
    session.execute(
        update(DeviceDesired)
        .where(DeviceDesired.device_id.in_(ids))
        .values(generation=DeviceDesired.generation + 1)
    )
    fresh = (
        select(DeviceDesired)
        .where(DeviceDesired.device_id.in_(ids))
        .execution_options(populate_existing=True)
    )
    rows = {r.device_id: r for r in session.scalars(fresh)}
    expires = now + timedelta(seconds=ctx.settings.desired_ttl_s)
    issued: dict[str, int] = {}
    for device_id in ids:
        row = rows.get(device_id)
        if row is None:
            # First state of a newly enrolled device; the row is created here, under the lock.
            row = DeviceDesired(device_id=device_id, generation=1)
            session.add(row)
        payload = desired_payload(
            device_id, row.generation, plan.get(device_id, []), issued=now, expires=expires
        )
        row.payload = envelope_bytes(sign_payload(payload, [ctx.hub_key]))
        row.modules_digest = assignments_digest(plan.get(device_id, []))
        row.issued = now
        row.expires = expires
        issued[device_id] = row.generation
    return issued


def change_fleet(ctx: HubContext, mutate: Callable[[Session], R]) -> FleetChange[R]:
    """Apply ``mutate`` and re-issue every device whose desired state it changes, atomically.

    Raises :class:`Conflict` on a port clash; nothing is stored then.
    """
    with ctx.sessions.begin() as session:
        take_fleet_lock(session)
        result = mutate(session)
        session.flush()
        after = current_plan(session)
        changed = changed_devices(issued_digests(session), after)
        conflicts = port_conflicts({d: after[d] for d in changed})
        if conflicts:
            raise Conflict(conflicts[0].message())
        issued = issue_desired(session, ctx, after, changed, now=utcnow())
    change = FleetChange(result=result, issued=issued)
    if ctx.mqtt is not None and issued:
        change.publish_errors = publish_current(ctx, list(issued))
        change.published = not change.publish_errors
    return change


@dataclass
class _PublishState:
    """Per hub process: one publisher at a time, and what each device was last sent."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, tuple[int, bool]] = field(default_factory=dict)  # generation, cleared


def _publish_state(ctx: HubContext) -> _PublishState:
    state = ctx.extras.setdefault("fleet.publish", _PublishState())
    assert isinstance(state, _PublishState)
    return state


def publish_current(ctx: HubContext, device_ids: Sequence[str]) -> list[str]:
    """Publish (retained) what the database holds now for each device; clear revoked ones.

    What this process already sent is skipped, so the states a device receives from one hub
    rise strictly even when several requests publish at once. Returns one message per device
    that could not be published (also recorded as an event).
    """
    mqtt = ctx.mqtt
    if mqtt is None or not device_ids:
        return []
    errors: list[str] = []
    state = _publish_state(ctx)
    with state.lock:
        with ctx.sessions.begin() as session:
            query = select(DeviceDesired).where(DeviceDesired.device_id.in_(device_ids))
            rows = {r.device_id: (r.generation, r.payload) for r in session.scalars(query)}
        for device_id in device_ids:
            generation, payload = rows.get(device_id, (0, None))
            current = (generation, payload is None)
            if state.sent.get(device_id) == current:
                continue
            try:
                if payload is None:
                    mqtt.clear_desired(device_id)
                else:
                    mqtt.publish_desired(device_id, payload)
            except FetchError as exc:
                errors.append(f"{device_id}: {exc}")
                continue
            state.sent[device_id] = current
    if errors:
        log.warning("desired state not published to %d device(s): %s", len(errors), errors[0])
        with ctx.sessions.begin() as session:
            record_event(
                session,
                "publish-failed",
                f"desired state not published to {len(errors)} device(s) (they will fetch it "
                f"over HTTP): {errors[0]}",
            )
    return errors


def republish_all(ctx: HubContext) -> list[str]:
    """Publish every device's current state again, e.g. after the broker lost retained messages."""
    state = _publish_state(ctx)
    with state.lock:
        state.sent.clear()
    with ctx.sessions.begin() as session:
        ids = list(session.scalars(select(DeviceDesired.device_id)))
    return publish_current(ctx, ids)


def stored_state(payload: bytes) -> DesiredState:
    """The desired state inside stored envelope bytes (the hub wrote them, so no re-verify)."""
    return DesiredState.model_validate(parse_envelope(payload, what="stored desired state").signed)


def renew_expiring(ctx: HubContext, device_ids: Sequence[str] | None = None) -> dict[str, int]:
    """Re-issue every desired state (of ``device_ids``, or all) with under half its lifetime left.

    Safe to call from several places and replicas at once: the check runs under the fleet lock,
    so a state renewed by one caller is not renewed again by the next.
    """
    with ctx.sessions.begin() as session:
        take_fleet_lock(session)
        horizon = utcnow() + timedelta(seconds=ctx.settings.desired_ttl_s / 2)
        query = select(DeviceDesired.device_id).where(
            DeviceDesired.payload.is_not(None), DeviceDesired.expires < horizon
        )
        if device_ids is not None:
            query = query.where(DeviceDesired.device_id.in_(device_ids))
        due = list(session.scalars(query))
        issued = issue_desired(session, ctx, current_plan(session), due, now=utcnow()) if due else {}
    if issued:
        publish_current(ctx, list(issued))
    return issued


def renew_if_expiring(ctx: HubContext, device_id: str) -> None:
    """Renew one device's desired state if it is due (cheap check first, without the lock)."""
    with ctx.sessions.begin() as session:
        row = session.get(DeviceDesired, device_id)
        expires = row.expires if row is not None else None
    if expires is not None and expires - utcnow() < timedelta(seconds=ctx.settings.desired_ttl_s / 2):
        renew_expiring(ctx, [device_id])
