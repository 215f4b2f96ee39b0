"""Registry tables: registered models (versioned per name) and pushed modules.

Files of both are rows (path, digest, size) pointing into the blob store, so "which blobs
does anything still use" and "which deployments use this model" are plain SQL.
``RegistryLock`` is one row that every transaction adding or removing blob references
updates first: on PostgreSQL its row lock, on SQLite the write lock that update takes, keep a
push from relying on a blob that a concurrent delete is removing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from cloud_hub.db.base import Base, utcnow


class Module(Base):
    """A pushed, verified module version; ``manifest`` is the exact signed ``module.json``."""

    __tablename__ = "modules"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_module_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    manifest_digest: Mapped[str] = mapped_column(String(71), unique=True, index=True)
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    signers: Mapped[list[str]] = mapped_column(JSON, default=list)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    files: Mapped[list[ModuleFile]] = relationship(
        back_populates="module", cascade="all, delete-orphan", order_by="ModuleFile.path"
    )

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class ModuleFile(Base):
    __tablename__ = "module_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    module_id: Mapped[int] = mapped_column(ForeignKey("modules.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    digest: Mapped[str] = mapped_column(String(71), index=True)
    size: Mapped[int] = mapped_column(BigInteger)

    module: Mapped[Module] = relationship(back_populates="files")


class ModelName(Base):
    """Per model name, the last version handed out (versions are never reused)."""

    __tablename__ = "model_names"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    properties: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    files: Mapped[list[ModelFile]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="ModelFile.path"
    )

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


class ModelFile(Base):
    __tablename__ = "model_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    digest: Mapped[str] = mapped_column(String(71), index=True)
    size: Mapped[int] = mapped_column(BigInteger)

    model: Mapped[ModelVersion] = relationship(back_populates="files")


class RegistryLock(Base):
    __tablename__ = "registry_lock"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0)


class ModuleSigner(Base):
    """A key allowed to sign module ``name``: its owner (the key that pushed the name first)
    or a key the admin granted it. Kept when every version is deleted: a name never changes
    hands by being emptied."""

    __tablename__ = "module_signers"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    keyid: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(8))  # OWNER or GRANTED (cloud_hub.registry.owners)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
