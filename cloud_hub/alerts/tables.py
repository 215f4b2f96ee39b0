"""Alert tables: the rules, and each rule's state per subject (a service or a device).

The state lives in the database, not in the evaluating process, so that a hub restart or a
change of the replica that evaluates neither re-fires an alert that is firing nor forgets one
that is pending.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cloud_hub.db.base import Base, utcnow


class AlertRule(Base):
    __tablename__ = "alert_rules"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: the service the rule is about; None: every service (fleet-wide)
    service: Mapped[str | None] = mapped_column(String(64), default=None)
    metric: Mapped[str] = mapped_column(String(20))
    operator: Mapped[str] = mapped_column(String(2))
    threshold: Mapped[float] = mapped_column(Float)
    state: Mapped[str | None] = mapped_column(String(20), default=None)
    for_s: Mapped[int] = mapped_column(Integer, default=0)
    severity: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AlertState(Base):
    """A rule's condition on one subject: pending since when, firing or not."""

    __tablename__ = "alert_states"

    rule: Mapped[str] = mapped_column(
        String(64), ForeignKey("alert_rules.name", ondelete="CASCADE"), primary_key=True
    )
    #: "service:NAME" or "device:ID"
    subject: Mapped[str] = mapped_column(String(80), primary_key=True)
    service: Mapped[str | None] = mapped_column(String(64), default=None)
    device_id: Mapped[str | None] = mapped_column(String(64), default=None)
    pending_since: Mapped[datetime]
    firing: Mapped[bool] = mapped_column(Boolean, default=False)
    fired_at: Mapped[datetime | None] = mapped_column(default=None)
    value: Mapped[str | None] = mapped_column(String(40), default=None)
    message: Mapped[str | None] = mapped_column(Text, default=None)
