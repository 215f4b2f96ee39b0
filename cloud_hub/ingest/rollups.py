"""The service roll-up as news: one event when a service's state across its devices changes.

The ingest worker learns devices' states a batch at a time. For the services whose state
changed on some device of a batch (and only those: a batch of repeated states costs nothing
here), the roll-up (``overview.queries.rollout``, the SQL rendering of ``cloud_hub/rollup.py``'s
rules) is read in parts: the batch's own devices before and after it is written, and only when
the worst of them changed, the service's other devices (the batch does not change them). So a
batch costs two queries over its own few devices, and one over the service's when its worst
moved, never one per report. A service whose roll-up moved gets an event of kind
``service_<state>`` (sent to webhooks as ``edgepack.service.state-changed`` about
``services/NAME``).

On PostgreSQL two replicas may apply reports of one service's devices at the same time; each
would see only its own half and both could miss the last step (say, to Healthy). So a batch
holds a transaction lock per service it rolls up (taken after its device rows, in name order,
so it never waits for a device row while holding one), and the second batch reads the roll-up
only once the first has committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.db.locks import lock_in
from cloud_hub.events import record_event
from cloud_hub.fleet.tables import Deployment
from cloud_hub.overview.queries import Rollout, rollout
from cloud_hub.rollup import worst
from manifests.states import ServiceState, StateOnDevice

#: Event-log kind prefix of a service's roll-up change (``service_healthy``, ...).
KIND_PREFIX = "service_"


def rollup_kind(state: ServiceState) -> str:
    return KIND_PREFIX + state.value.lower()


@dataclass(frozen=True)
class _Before:
    deployment: Deployment
    devices: frozenset[str]  # the batch's devices whose state for the service changed
    batch: Rollout  # those devices, before the batch


def _worst(r: Rollout) -> StateOnDevice | None:
    return worst(StateOnDevice(name) for name, n in r.by_state.items() if n)


@dataclass(frozen=True)
class Rollups:
    """The batch's part of some services' roll-ups, read before the batch is written."""

    before: tuple[_Before, ...]

    @classmethod
    def read(cls, session: Session, changed: Mapping[str, Set[str]]) -> Rollups:
        """Lock the roll-up of each deployed service of ``changed`` (service → the batch's
        devices where its state changed) and read those devices' part of it."""
        names = sorted(changed)
        if not names:
            return cls(())
        for name in names:
            lock_in(session, f"service-rollup:{name}")
        before: list[_Before] = []
        deployments = select(Deployment).where(Deployment.name.in_(names)).order_by(Deployment.name)
        for d in session.scalars(deployments):
            devices = frozenset(changed[d.name])
            before.append(_Before(d, devices, rollout(session, d, only=devices)))
        return cls(tuple(before))

    def record_changes(self, session: Session) -> list[str]:
        """Read the batch's devices again (the batch written) and record an event for each
        service whose roll-up moved; those services."""
        moved: list[str] = []
        for b in self.before:
            after = rollout(session, b.deployment, only=b.devices)
            if _worst(after) is _worst(b.batch):
                # The service is the worst of its devices: the same worst among the batch's
                # ones leaves it where it was, whatever the others are (no query over them).
                continue
            others = rollout(session, b.deployment, excluding=b.devices)
            was, now = others.plus(b.batch).state, others.plus(after).state
            if now is was:
                continue
            moved.append(b.deployment.name)
            record_event(
                session,
                rollup_kind(now),
                f"service {b.deployment.name} is {now.value} (was {was.value})",
                service=b.deployment.name,
            )
        return moved
