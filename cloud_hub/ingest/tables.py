"""Ingest tables: each device's latest reported state, per-module states, telemetry samples.

The online flag, last-seen time and agent version live on FLEET's ``Device`` row; ingest
writes them there so that a device listing needs no join.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cloud_hub.db.base import Base, utcnow


class DeviceReport(Base):
    """The latest full reported state of a device (as the device sent it, validated)."""

    __tablename__ = "device_reports"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reported_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    applied_generation: Mapped[int] = mapped_column(Integer, default=0)
    agent_version: Mapped[str] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class ModuleState(Base):
    """One service's state on one device, from the device's latest reported state."""

    __tablename__ = "module_states"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    service: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    state: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    manifest_digest: Mapped[str | None] = mapped_column(String(71), default=None)
    since: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The whole manifests.reported.ModuleStatus, so that it can be rebuilt exactly.
    status: Mapped[dict[str, Any]] = mapped_column(JSON)


class TelemetrySample(Base):
    """One metrics sample; only the newest ``settings.telemetry_keep`` per device are kept."""

    __tablename__ = "telemetry_samples"
    # received_at: the alert rounds (every few seconds) and the charts read the newest window.
    __table_args__ = (
        Index("ix_telemetry_device_id_id", "device_id", "id"),
        Index("ix_telemetry_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[datetime] = mapped_column(index=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
