"""The rollout of a service's latest deployment change, as a row (never process memory).

One row per service: a new deploy replaces it. Every transition (wave released, bake started,
halted, promoted, completed, aborted) increments ``step`` under the fleet lock and only if
``step`` is still what the deciding replica read, so two replicas (or a replica and an
operator) never apply one decision twice, and a restarted hub goes on from the row.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cloud_hub.db.base import Base, utcnow

RUNNING = "running"
HALTED = "halted"
COMPLETED = "completed"
ABORTED = "aborted"
ROLLED_BACK = "rolled-back"
#: States in which the rollout decides which devices run which version.
STAGING = (RUNNING, HALTED)


class Rollout(Base):
    __tablename__ = "rollouts"

    service: Mapped[str] = mapped_column(
        String(64), ForeignKey("deployments.name", ondelete="CASCADE"), primary_key=True
    )
    #: random; with a device's id it fixes the device's wave (cloud_hub.rollouts.waves)
    rollout_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(20))
    #: the wave released last, 0-based: devices of waves 0..wave run the new version
    wave: Mapped[int] = mapped_column(Integer, default=0)
    waves: Mapped[list[float]] = mapped_column(JSON)
    bake_s: Mapped[float] = mapped_column(Float)
    #: the gates as text (manifests.rollout.parse_gate reads them back)
    gates: Mapped[list[str]] = mapped_column(JSON)
    on_failure: Mapped[str] = mapped_column(String(10))
    spread_by: Mapped[str | None] = mapped_column(String(64), default=None)
    health_timeout_s: Mapped[float] = mapped_column(Float)
    #: group → per wave, the hash number below which a device is in it (rollouts.waves)
    thresholds: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: the version the devices not yet released keep running (and a rollback returns to)
    from_module: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[str] = mapped_column(String(64))
    from_digest: Mapped[str] = mapped_column(String(71))
    to_version: Mapped[str] = mapped_column(String(64))
    to_digest: Mapped[str] = mapped_column(String(71))
    wave_started_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: when every device of the released waves was Healthy on the new version; None before
    bake_started_at: Mapped[datetime | None] = mapped_column(default=None)
    #: why it halted (the status line), or why it ended
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    step: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
