"""Per-device desired state: what the hub wants a device to run, signed by the hub.

The agent refuses a state addressed to another device, one whose generation is not newer than
what it applied, and one past its expiry (see :func:`check_desired`).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from manifests.digests import DIGEST_PATTERN
from manifests.errors import TrustError
from manifests.module import NAME_PATTERN, VERSION_PATTERN

DESIRED_SCHEMA = "edgepack.desired/v1"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62})$"


class RuntimeKind(StrEnum):
    DOCKER = "docker"
    PROCESS = "process"


class RestartPolicy(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class HealthProbe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(default="/healthz", pattern=r"^/")
    period_s: float = Field(default=10, gt=0)
    initial_delay_s: float = Field(default=0, ge=0)
    timeout_s: float = Field(default=2, gt=0)
    failure_threshold: int = Field(default=3, ge=1)


class DeploymentSettings(BaseModel):
    """How one module runs on a device."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(ge=1, le=65535)
    env: dict[str, str] = Field(default_factory=dict)
    runtime: RuntimeKind = RuntimeKind.DOCKER
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    workers: int = Field(default=1, ge=1, le=64)
    cpu: float | None = Field(default=None, gt=0)
    memory_mb: int | None = Field(default=None, gt=0)
    health: HealthProbe = Field(default_factory=HealthProbe)


class ModuleAssignment(BaseModel):
    """One deployment (service) as it applies to one device."""

    model_config = ConfigDict(extra="forbid")

    service: str = Field(pattern=NAME_PATTERN, description="deployment (service) name")
    module: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    manifest_digest: str = Field(pattern=DIGEST_PATTERN)
    settings: DeploymentSettings


class DesiredState(BaseModel):
    """The ``signed`` payload of a desired-state envelope."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.desired/v1"] = Field(default="edgepack.desired/v1", alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    generation: int = Field(ge=1)
    issued: datetime
    expires: datetime
    modules: list[ModuleAssignment] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> DesiredState:
        services = [m.service for m in self.modules]
        if len(set(services)) != len(services):
            raise ValueError("a service is listed twice")
        ports = [m.settings.port for m in self.modules]
        if len(set(ports)) != len(ports):
            raise ValueError("two modules bind the same port")
        if self.expires <= self.issued:
            raise ValueError("expires must be after issued")
        return self


def check_desired(
    state: DesiredState, *, device_id: str, applied_generation: int, now: datetime
) -> None:
    """Refuse a desired state that is for another device, replayed/rolled back, or expired."""
    if state.device_id != device_id:
        raise TrustError(
            f"desired state is for device {state.device_id!r}, not {device_id!r}; refused"
        )
    if state.generation <= applied_generation:
        raise TrustError(
            f"desired state generation {state.generation} is not newer than the applied "
            f"generation {applied_generation}; refused as a replay or rollback"
        )
    if now >= state.expires:
        raise TrustError(
            f"desired state generation {state.generation} expired at "
            f"{state.expires.isoformat()}; the hub must re-issue it"
        )
