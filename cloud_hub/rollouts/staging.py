"""The rollouts the fleet plan must respect: those that still stage devices (running, halted)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.fleet.plan import Staged
from cloud_hub.rollouts.tables import STAGING, Rollout


def staging_rollouts(session: Session) -> dict[str, Rollout]:
    return {r.service: r for r in session.scalars(select(Rollout).where(Rollout.state.in_(STAGING)))}


def staged_view(row: Rollout | None, signers: Mapping[str, Sequence[str]]) -> Staged | None:
    if row is None:
        return None
    return Staged(
        rollout_id=row.rollout_id,
        wave=row.wave,
        waves=tuple(row.waves),
        thresholds={k: list(v) for k, v in row.thresholds.items()},
        spread_by=row.spread_by,
        module=row.from_module,
        version=row.from_version,
        manifest_digest=row.from_digest,
        signers=tuple(signers.get(row.from_module, ())),
    )
