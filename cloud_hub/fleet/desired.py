"""Issuing signed desired states: the database and broker edge around ``fleet.plan``.

Every change to what devices should run goes through :func:`change_fleet`:

1. take the fleet lock (first statement of the transaction, see ``fleet.tables``);
2. plan the fleet, apply the change, plan again;
3. refuse the change if any device would get two services on one port (nothing is stored);
4. for each device whose assignments changed, allocate the next generation in SQL, sign the
   full desired state with the hub key and store the envelope bytes;
5. return, with the mutation's result, the :class:`~cloud_hub.fleet.effects.Effects` of the
   change: which states were issued, which cleared, whether broker accounts changed.

Nothing here publishes: the caller hands the effects to the one executor
(:mod:`cloud_hub.fleet.executor`) after the commit, so that a device is never told about a
state the database might still roll back.

A desired state expires (``settings.desired_ttl_s``). :func:`renew_expiring` re-issues those
with under half their lifetime left; a device fetching its state over HTTP triggers it for
itself, and the upkeep loop calls it periodically for devices that only listen on MQTT.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Select, delete, insert, select, update
from sqlalchemy.orm import Session

from cloud_hub.data.batches import note_services_left
from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.errors import Conflict
from cloud_hub.fleet.effects import Effects
from cloud_hub.fleet.plan import (
    DeploymentView,
    DeviceView,
    Plan,
    Staged,
    changed_devices,
    desired_payloads,
    plan_digests,
    plan_fleet,
    port_conflicts,
)
from cloud_hub.fleet.tables import Deployment, Device, DeviceDesired, FleetLock, ServiceChange
from cloud_hub.fleet.targeting import Target
from cloud_hub.registry.owners import signers_of
from cloud_hub.rollouts.staging import staged_view, staging_rollouts
from manifests.desired import DeploymentSettings, DesiredState
from manifests.signing import parse_envelope, signed_envelope_bytes

R = TypeVar("R")


@dataclass(frozen=True)
class DesiredSigner:
    """What issuing a desired state needs: the hub's key and how long a state lives."""

    key: Ed25519PrivateKey
    ttl_s: int


def take_fleet_lock(session: Session) -> None:
    session.execute(update(FleetLock).where(FleetLock.id == 1).values(version=FleetLock.version + 1))


def deployment_view(
    row: Deployment, signers: Sequence[str] = (), staged: Staged | None = None
) -> DeploymentView:
    return DeploymentView(
        name=row.name,
        module=row.module_name,
        version=row.module_version,
        manifest_digest=row.manifest_digest,
        settings=DeploymentSettings.model_validate(row.settings),
        target=Target.model_validate(row.target),
        signers=tuple(signers),
        staged=staged,
    )


def issued_digests(session: Session) -> dict[str, str | None]:
    rows = session.execute(
        select(DeviceDesired.device_id, DeviceDesired.modules_digest).where(
            DeviceDesired.payload.is_not(None)
        )
    )
    return {device_id: digest for device_id, digest in rows}


def current_plan(session: Session) -> Plan:
    # Columns, not ORM rows: every fleet change and roll-up plans the whole fleet.
    rows = session.execute(select(Device.id, Device.tags).where(Device.revoked.is_(False)))
    devices = [DeviceView(id=device_id, tags=dict(tags or {})) for device_id, tags in rows]
    return plan_fleet(devices, deployment_views(session))


def deployment_views(session: Session) -> list[DeploymentView]:
    """Every deployment as the plan sees it: with the keys that may sign its module (a device
    checks them too) and, under a rollout, the previous module its unreleased waves keep."""
    deployment_rows = list(session.scalars(select(Deployment)))
    rollouts = staging_rollouts(session)
    names = {r.module_name for r in deployment_rows} | {r.from_module for r in rollouts.values()}
    signers = signers_of(session, names)
    return [
        deployment_view(r, signers.get(r.module_name, ()), staged_view(rollouts.get(r.name), signers))
        for r in deployment_rows
    ]


def account_snapshot(session: Session) -> frozenset[tuple[object, ...]]:
    """The broker accounts the device table implies: (id, credentials generation, password
    hash, the new one of a rotation in flight) of every active device."""
    rows = session.execute(
        select(
            Device.id, Device.credentials_generation, Device.mqtt_password_hash,
            Device.next_mqtt_password_hash,
        ).where(Device.revoked.is_(False))
    )
    return frozenset(tuple(row) for row in rows)


@dataclass
class FleetChange(Generic[R]):
    """What a committed change did: the mutation's result and its effects, to be applied."""

    result: R
    effects: Effects = field(default_factory=Effects)


def issue_desired(
    session: Session, signer: DesiredSigner, plan: Plan, device_ids: Sequence[str], *, now: datetime
) -> dict[str, int]:
    """Sign and store a new desired state for each device; returns the new generations.

    Statements, not ORM rows (a deploy re-issues the whole fleet): the generations are
    allocated by one UPDATE per chunk, the previous states read as columns, and the new ones
    written by one executemany UPDATE (and one INSERT for devices issued their first state).
    """
    if not device_ids:
        return {}
    ids = sorted(set(device_ids))
    before: dict[str, tuple[int, bytes | None]] = {}
    for chunk in _chunks(ids):
        session.execute(
            update(DeviceDesired)
            .where(DeviceDesired.device_id.in_(chunk))
            .values(generation=DeviceDesired.generation + 1)
            .execution_options(synchronize_session=False)
        )
        rows = session.execute(
            select(DeviceDesired.device_id, DeviceDesired.generation, DeviceDesired.payload).where(
                DeviceDesired.device_id.in_(chunk)
            )
        )
        before.update({device_id: (generation, payload) for device_id, generation, payload in rows})
    # A device without a row gets its first state (generation 1); the row is created here,
    # under the fleet lock.
    issued = {device_id: before.get(device_id, (1, None))[0] for device_id in ids}
    expires = now + timedelta(seconds=signer.ttl_s)
    payloads = desired_payloads(plan, issued, issued=now, expires=expires)
    digests = plan_digests({device_id: plan.get(device_id, []) for device_id in ids})
    known = _service_changes_of(session, ids)
    changes: list[dict[str, object]] = []
    rewritten: list[str] = []
    updates: list[dict[str, object]] = []
    inserts: list[dict[str, object]] = []
    for device_id in ids:
        generation, old = before.get(device_id, (1, None))
        payload = payloads[device_id]
        old_assignments = _assignments(old)
        rows_now = service_changes(
            device_id, generation, old, payload, known.get(device_id, {}), old=old_assignments
        )
        if {r["service"]: r["generation"] for r in rows_now} != known.get(device_id, {}):
            rewritten.append(device_id)  # a renewal changes no assignment and writes nothing here
            changes += rows_now
            # Services that leave the device: it may still upload their collected data a while.
            left = set(old_assignments) - {str(r["service"]) for r in rows_now}
            note_services_left(session, device_id, left, now=now)
        values: dict[str, object] = {
            "device_id": device_id,
            "payload": signed_envelope_bytes(payload, [signer.key]),
            "modules_digest": digests[device_id],
            "issued": now,
            "expires": expires,
        }
        (updates if device_id in before else inserts).append(values)
    if updates:
        session.execute(update(DeviceDesired), updates)  # executemany, by primary key
    if inserts:
        session.execute(insert(DeviceDesired), [{**v, "generation": 1} for v in inserts])
    for chunk in _chunks(rewritten):
        session.execute(delete(ServiceChange).where(ServiceChange.device_id.in_(chunk)))
    if changes:
        session.execute(insert(ServiceChange), changes)
    return issued


#: Device ids per IN (...): SQLite allows 32,766 bound values per statement.
_CHUNK = 5000


def _chunks(ids: Sequence[str]) -> list[Sequence[str]]:
    return [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def _service_changes_of(session: Session, ids: Sequence[str]) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for chunk in _chunks(ids):
        rows = session.execute(
            select(ServiceChange.device_id, ServiceChange.service, ServiceChange.generation).where(
                ServiceChange.device_id.in_(chunk)
            )
        )
        for device_id, service, generation in rows:
            found.setdefault(device_id, {})[service] = generation
    return found


def service_changed_at(session: Session, service: str) -> dict[str, int]:
    """device id → the generation at which ``service`` last changed on it."""
    rows = session.execute(
        select(ServiceChange.device_id, ServiceChange.generation).where(ServiceChange.service == service)
    )
    return {device_id: generation for device_id, generation in rows}


def device_changed_at(session: Session, device_id: str) -> dict[str, int]:
    """service → the generation at which it last changed on ``device_id``."""
    rows = session.execute(
        select(ServiceChange.service, ServiceChange.generation).where(ServiceChange.device_id == device_id)
    )
    return {service: generation for service, generation in rows}


def _assignments(payload: bytes | None) -> dict[str, object]:
    """service → its assignment as JSON, from stored envelope bytes (None: never issued)."""
    if payload is None:
        return {}
    return {m["service"]: m for m in json.loads(payload)["signed"]["modules"]}


def service_changes(
    device_id: str,
    generation: int,
    before: bytes | None,
    after: dict[str, object],
    known: dict[str, int],
    *,
    old: dict[str, object] | None = None,
) -> list[dict[str, object]]:
    """The ``service_changes`` rows of a device once its new state (``after``, the ``signed``
    document, at ``generation``) replaces the stored one (``before``): a service whose
    assignment changed, or that is new, changed now; any other keeps the generation it had
    (``known``; none for one unchanged since before this table existed); a service no longer
    assigned has no row. ``old``: ``before``'s assignments when the caller parsed them already."""
    if old is None:
        old = _assignments(before)
    modules = after["modules"]
    assert isinstance(modules, list)
    rows: list[dict[str, object]] = []
    for m in modules:
        service = m["service"]
        changed_at = generation if old.get(service) != m else known.get(service)
        if changed_at is not None:
            rows.append({"device_id": device_id, "service": service, "generation": changed_at})
    return rows


def change_fleet(sessions: Sessions, signer: DesiredSigner, mutate: Callable[[Session], R]) -> FleetChange[R]:
    """Apply ``mutate`` and re-issue every device whose desired state it changes, atomically.

    Returns the result and the effects (nothing is published here). Raises
    :class:`Conflict` on a port clash; nothing is stored then.
    """
    with sessions.begin() as session:
        take_fleet_lock(session)
        accounts_before = account_snapshot(session)
        held_before = set(issued_digests(session))
        result = mutate(session)
        session.flush()
        after = current_plan(session)
        changed = changed_devices(issued_digests(session), after)
        conflicts = port_conflicts({d: after[d] for d in changed})
        if conflicts:
            raise Conflict(conflicts[0].message())
        issued = issue_desired(session, signer, after, changed, now=utcnow())
        cleared = frozenset(held_before - set(issued_digests(session)))
        accounts_changed = account_snapshot(session) != accounts_before
    return FleetChange(result=result, effects=Effects(issued, cleared, accounts_changed))


def stored_state(payload: bytes) -> DesiredState:
    """The desired state inside stored envelope bytes (the hub wrote them, so no re-verify)."""
    return DesiredState.model_validate(parse_envelope(payload, what="stored desired state").signed)


def renew_expiring(
    sessions: Sessions, signer: DesiredSigner, device_ids: Sequence[str] | None = None
) -> Effects:
    """Re-issue every desired state (of ``device_ids``, or all) with under half its lifetime left.

    Safe to call from several places and replicas at once: the check runs under the fleet lock,
    so a state renewed by one caller is not renewed again by the next.
    """

    def due_query(horizon: datetime) -> Select[str]:
        query = select(DeviceDesired.device_id).where(
            DeviceDesired.payload.is_not(None), DeviceDesired.expires < horizon
        )
        return query if device_ids is None else query.where(DeviceDesired.device_id.in_(device_ids))

    with sessions.begin() as session:
        # Upkeep asks every few seconds: only take the fleet lock when something may be due.
        if session.scalar(due_query(utcnow() + timedelta(seconds=signer.ttl_s / 2)).limit(1)) is None:
            return Effects()
    with sessions.begin() as session:
        take_fleet_lock(session)
        due = list(session.scalars(due_query(utcnow() + timedelta(seconds=signer.ttl_s / 2))))
        issued = issue_desired(session, signer, current_plan(session), due, now=utcnow()) if due else {}
    return Effects(issued=issued)


def is_expiring(sessions: Sessions, device_id: str, ttl_s: int) -> bool:
    """Whether one device's state has under half its lifetime left (a cheap check, no lock)."""
    with sessions.begin() as session:
        row = session.get(DeviceDesired, device_id)
        expires = row.expires if row is not None else None
    return expires is not None and expires - utcnow() < timedelta(seconds=ttl_s / 2)


def change_devices(
    sessions: Sessions,
    signer: DesiredSigner,
    mutate: Callable[[Session], R],
    devices: Callable[[R], Sequence[str]],
) -> FleetChange[R]:
    """:func:`change_fleet` for a change that can move no device but those ``devices`` names
    from its result (joins: devices added or re-enabled, nothing else changed). Only their plan
    is computed and compared, so a batch of joins costs what the batch holds, not the fleet."""
    with sessions.begin() as session:
        take_fleet_lock(session)
        result = mutate(session)
        session.flush()
        ids = sorted(set(devices(result)))
        if not ids:
            return FleetChange(result=result)
        after = _plan_of(session, ids)
        held = _issued_digests_of(session, ids)
        changed = changed_devices(held, after)
        conflicts = port_conflicts({d: after[d] for d in changed})
        if conflicts:
            raise Conflict(conflicts[0].message())
        issued = issue_desired(session, signer, after, changed, now=utcnow())
    # A device added or re-enabled is a broker account added.
    return FleetChange(result=result, effects=Effects(issued, frozenset(), True))


def _plan_of(session: Session, ids: Sequence[str]) -> Plan:
    devices: list[DeviceView] = []
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(Device.id, Device.tags).where(
                Device.id.in_(ids[start : start + 500]), Device.revoked.is_(False)
            )
        )
        devices += [DeviceView(id=device_id, tags=dict(tags or {})) for device_id, tags in rows]
    # A device joining under a rollout gets the version its wave gives, as every device does.
    return plan_fleet(devices, deployment_views(session))


def _issued_digests_of(session: Session, ids: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(DeviceDesired.device_id, DeviceDesired.modules_digest).where(
                DeviceDesired.device_id.in_(ids[start : start + 500]), DeviceDesired.payload.is_not(None)
            )
        )
        out.update((device_id, digest) for device_id, digest in rows)
    return out
