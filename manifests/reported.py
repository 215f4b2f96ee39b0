"""What an agent reports: the state of each module it runs, and telemetry samples."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from manifests.desired import DEVICE_ID_PATTERN, RuntimeKind
from manifests.digests import DIGEST_PATTERN
from manifests.module import NAME_PATTERN, VERSION_PATTERN
from manifests.states import ServiceState


class Progress(BaseModel):
    """How far a module in ``Transitioning`` has come (downloading blobs, pulling an image)."""

    model_config = ConfigDict(extra="forbid")

    phase: Literal["download", "pull", "start", "switch"]
    done_bytes: int = Field(default=0, ge=0)
    total_bytes: int = Field(default=0, ge=0)


class ModuleStatus(BaseModel):
    """One service on one device.

    ``manifest_digest``/``version`` name the module version the state is about: the one the
    desired state asks for. What answers requests right now is ``serving_digest`` /
    ``serving_version``; they differ while an update is under way and after a rollback
    (``Failed`` for the desired version while the previous one keeps serving).
    """

    model_config = ConfigDict(extra="forbid")

    service: str = Field(pattern=NAME_PATTERN)
    manifest_digest: str | None = Field(default=None, pattern=DIGEST_PATTERN)
    version: str | None = Field(default=None, pattern=VERSION_PATTERN)
    generation: int | None = Field(default=None, ge=0, description="desired-state generation")
    state: ServiceState
    reason: str | None = Field(default=None, max_length=2000)
    since: datetime
    runtime: RuntimeKind | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    restarts: int = Field(default=0, ge=0)
    serving_digest: str | None = Field(default=None, pattern=DIGEST_PATTERN)
    serving_version: str | None = Field(default=None, pattern=VERSION_PATTERN)
    progress: Progress | None = None
    endpoint: str | None = Field(
        default=None,
        max_length=300,
        pattern=r"^https?://[^\s/]+$",
        description="where clients reach the service on this device (scheme://host:port)",
    )


class ReportedState(BaseModel):
    """Full reported state of one device (retained on ``.../reported``)."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.reported/v1"] = Field(
        default="edgepack.reported/v1", alias="schema"
    )
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    reported_at: datetime
    agent_version: str = Field(max_length=64)
    applied_generation: int = Field(ge=0)
    runtimes: list[RuntimeKind] = Field(default_factory=list)
    last_error: str | None = Field(default=None, max_length=2000)
    modules: list[ModuleStatus] = Field(default_factory=list)


class ModuleMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str = Field(pattern=NAME_PATTERN)
    requests_total: int = Field(ge=0)
    errors_total: int = Field(ge=0)
    requests_per_s: float = Field(ge=0)
    p50_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)
    cpu_percent: float | None = Field(default=None, ge=0)
    memory_mb: float | None = Field(default=None, ge=0)


class Telemetry(BaseModel):
    """One metrics sample (``.../telemetry``, QoS 0, not retained)."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.telemetry/v1"] = Field(
        default="edgepack.telemetry/v1", alias="schema"
    )
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    ts: datetime
    cpu_percent: float | None = Field(default=None, ge=0)
    memory_mb: float | None = Field(default=None, ge=0)
    agent_memory_mb: float | None = Field(default=None, ge=0)
    modules: list[ModuleMetrics] = Field(default_factory=list)
