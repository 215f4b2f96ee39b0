"""Fleet tables: devices, deployments (services) and each device's signed desired state.

``FleetLock`` is a single row (made by the baseline migration) that every transaction changing
what devices should run updates *first*. On PostgreSQL that row lock, and on SQLite the
database write lock it takes, serialise those transactions, so two concurrent deploys never
compute a device's desired state from a view that misses the other's deployment, and
generations rise strictly — across hub replicas too, because the lock lives in the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from cloud_hub.db.base import Base, utcnow


class Device(Base):
    __tablename__ = "devices"
    # The dashboard counts and filters active devices by online status on every refresh.
    __table_args__ = (Index("ix_devices_revoked_online", "revoked", "online"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    mqtt_password_hash: Mapped[str] = mapped_column(String(255))
    # The same password as RabbitMQ's own salted hash (broker.rabbitmq); None for a device
    # enrolled before the hub knew RabbitMQ.
    rabbitmq_password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    # sha256 hex of the device's HTTP token: looked up directly, the token itself is never kept.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Written by ingest (STATE) from the device's online/reported messages.
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None] = mapped_column(default=None)
    agent_version: Mapped[str | None] = mapped_column(String(64), default=None)
    # A device that joined by itself (``edgepack agent join``): its Ed25519 key, hex. Unique, and
    # never cleared on revocation, so a join request replayed later is refused for good.
    public_key: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    # The provisioning token it joined with (its public id), for 'device show' and audits.
    joined_with: Mapped[str | None] = mapped_column(String(16), default=None)
    # When the request it joined with (or last asked again with) was made: a newer request of
    # the same device is answered again, an older or equal one is a replay.
    join_issued: Mapped[datetime | None] = mapped_column(default=None)
    # Credential rotation (cloud_hub.fleet.rotation, docs/enrolment.md). The generation names
    # the broker user (manifests.rotation.broker_username: 0 is the device id).
    credentials_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    credentials_rotated_at: Mapped[datetime | None] = mapped_column(default=None)
    # When the admin asked for a rotation; None: none in flight (one at a time).
    rotation_requested: Mapped[datetime | None] = mapped_column(default=None)
    # The newest signing request accepted from this device: an older or equal one is a replay.
    rotation_issued: Mapped[datetime | None] = mapped_column(default=None)
    # The new credentials' verifiers while a rotation is in flight: they work beside the
    # current ones until the device confirms with them (then they replace them).
    next_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, index=True, default=None)
    next_mqtt_password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    next_rabbitmq_password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    next_public_key: Mapped[str | None] = mapped_column(String(64), default=None)
    # The key the current credentials were derived from after a rotation (never reused).
    credentials_key: Mapped[str | None] = mapped_column(String(64), default=None)


class ProvisioningToken(Base):
    """A fleet-wide token a device image carries to join by itself (docs/enrolment.md).

    Only the token's sha256 is kept. ``used`` counts joins, raised by one conditional UPDATE
    that also checks the bound, so concurrent joins (from any replica) never exceed ``max_uses``.
    """

    __tablename__ = "provisioning_tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Tags every device joining with it gets; a value may name the device with '{id}'.
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    max_uses: Mapped[int] = mapped_column(Integer)
    used: Mapped[int] = mapped_column(Integer, default=0)
    expires: Mapped[datetime] = mapped_column()
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    # Joins with it wait in pending_joins until an admin approves them (each spends a use).
    approval: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PendingJoin(Base):
    """A verified join of a token that needs approval: the device's verifiers, not yet a device
    (no device row, no broker account). A rejected one stays, so the device is told so."""

    __tablename__ = "pending_joins"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[str] = mapped_column(String(16))
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    mqtt_password_hash: Mapped[str] = mapped_column(String(255))
    rabbitmq_password_hash: Mapped[str] = mapped_column(String(255))
    issued: Mapped[datetime] = mapped_column()
    rejected: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    """A named service: one module version, its settings, and which devices run it."""

    __tablename__ = "deployments"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    module_name: Mapped[str] = mapped_column(String(64), index=True)
    module_version: Mapped[str] = mapped_column(String(64))
    manifest_digest: Mapped[str] = mapped_column(String(71), index=True)
    # manifests.desired.DeploymentSettings as JSON.
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    # {"devices": [ids]} or {"selector": {key: value}} (cloud_hub.fleet.targeting.Target).
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ServiceKeys(Base):
    """The endpoint keys of a service deployed with ``authEnabled`` (see fleet.endpoint_keys)."""

    __tablename__ = "service_keys"

    service: Mapped[str] = mapped_column(
        String(64), ForeignKey("deployments.name", ondelete="CASCADE"), primary_key=True
    )
    primary: Mapped[str] = mapped_column(String(256))
    secondary: Mapped[str] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeviceDesired(Base):
    """The latest signed desired state of a device (the bytes MQTT and HTTP both serve)."""

    __tablename__ = "device_desired"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    # Only ever incremented in SQL (generation = generation + 1), never reset, even on revoke.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    # None once the device is revoked (nothing to serve).
    payload: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    # cloud_hub.fleet.plan.assignments_digest of the modules in ``payload``.
    modules_digest: Mapped[str | None] = mapped_column(String(71), default=None)
    issued: Mapped[datetime | None] = mapped_column(default=None)
    expires: Mapped[datetime | None] = mapped_column(default=None)
    # What the broker's retained message for this device was last made to be, by any replica
    # (fleet.publish): the generation published, and whether it was a clearing. A state whose
    # generation differs is still to be published (a replica died before it could).
    published_generation: Mapped[int | None] = mapped_column(Integer, default=None)
    published_cleared: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ServiceChange(Base):
    """The desired-state generation at which a service's assignment on a device last changed
    (module or settings). A report on an earlier generation is about what was there before
    (``cloud_hub.rollup``): a settings-only change keeps the module's digest, so nothing else
    tells the two apart. Written with the desired state (``fleet.desired.issue_desired``)."""

    __tablename__ = "service_changes"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    service: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)


class FleetLock(Base):
    __tablename__ = "fleet_lock"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
