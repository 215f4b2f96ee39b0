"""The batches of collected data the hub holds, and the services devices lost recently.

A batch's bytes live in the data store (:mod:`cloud_hub.data.store`) under ``path``; its row
is what lists, filters and retention read. ``(device_id, digest)`` is unique: the same batch
sent again by the same device is stored once.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, Date, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from cloud_hub.db.base import Base, utcnow


class DataBatch(Base):
    __tablename__ = "data_batches"
    __table_args__ = (
        UniqueConstraint("device_id", "digest", name="uq_data_batches_device_digest"),
        # A service's listing pages through its batches in id order.
        Index("ix_data_batches_service_id", "service", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    digest: Mapped[str] = mapped_column(String(71))
    # No foreign key: the data stays (until retention) after its device is revoked.
    device_id: Mapped[str] = mapped_column(String(64))
    service: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    designation: Mapped[str] = mapped_column(String(32))
    day: Mapped[date] = mapped_column(Date)
    records: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    #: the time of the batch's first and last record (filters by time read these)
    first_at: Mapped[datetime]
    last_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    path: Mapped[str] = mapped_column(String(1024))


class DataSource(Base):
    """A service that left a device's desired state, and when: the device may still upload
    that service's data for ``data_grace_days`` (it may have been offline with a full spool)."""

    __tablename__ = "data_sources"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    service: Mapped[str] = mapped_column(String(64), primary_key=True)
    removed_at: Mapped[datetime] = mapped_column(default=utcnow)
