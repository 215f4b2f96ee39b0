"""The hub's answers as the SDK reads them: small typed records.

Where an answer carries one of edgepack's contracts (a module manifest, deployment settings, a
module's reported state, a device's credentials) the record holds that contract from
``manifests``; the rest is the hub's REST view (``/docs`` on a hub documents it). Fields the
hub adds later are ignored, so an older SDK keeps working against a newer hub.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from manifests.desired import DeploymentSettings
from manifests.errors import HubUnavailable
from manifests.module import ModuleManifest
from manifests.reported import FailureDetail, ModuleStatus, Progress
from manifests.states import ServiceState, StateOnDevice


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    _raw: Any = PrivateAttr(default=None)

    @classmethod
    def of(cls, data: Any) -> Self:
        """Read one answer; one the SDK cannot read is the hub's failure, not the caller's."""
        try:
            record = cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            raise HubUnavailable(
                f"the hub's answer is not a {cls.__name__} this SDK can read ({where}: {err['msg']}); "
                "is the hub the same edgepack version?"
            ) from None
        record._raw = data
        return record

    @property
    def raw(self) -> Any:
        """The answer as the hub sent it (decoded JSON), e.g. for ``--json`` output."""
        return self._raw if self._raw is not None else self.model_dump(mode="json")


class FileRecord(_Answer):
    """One file of a model or module version: its path, sha256 digest and size."""

    path: str
    digest: str
    size: int


class _Version(_Answer):
    """What model and module versions have in common."""

    name: str
    version: int | str
    size: int
    created_at: datetime
    files: list[FileRecord]

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"


class ModelRecord(_Version):
    """A registered model version."""

    version: int
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    properties: dict[str, Any] = Field(default_factory=dict)


class ModuleRecord(_Version):
    """A module version on the hub (pushed as a signed ``.edgepack`` or built by ``Model.deploy``)."""

    version: str
    manifest_digest: str
    signers: list[str] = Field(default_factory=list)


class ModuleDetail(ModuleRecord):
    """A module version with its signed manifest."""

    manifest: ModuleManifest


class PushResult(ModuleRecord):
    """What a push did: ``created`` False when the hub held the very same module already."""

    created: bool
    new_blobs: int
    reused_blobs: int


class ModuleSigners(_Answer):
    """The keys that may sign new versions of a module name: its owners (the keys of its first
    push) and the keys the hub's admin granted it."""

    name: str
    owners: list[str]
    granted: list[str] = Field(default_factory=list)


class SignerChange(ModuleSigners):
    """A grant or revoke: the name's keys afterwards, and the devices re-issued a desired state
    naming them (``changed`` False: the key could sign the name already)."""

    keyid: str
    changed: bool
    issued: dict[str, int] = Field(description="device id → new desired-state generation")
    published: bool | None = Field(default=None, description="None when the hub runs without a broker")
    publish_errors: list[str] = Field(default_factory=list)


class Deleted(_Answer):
    """A deleted model or module version and the blobs that freed on the hub."""

    deleted: str
    freed_blobs: list[str]


class FleetChange(_Answer):
    """The devices whose desired state a change re-issued, and whether it reached the broker."""

    issued: dict[str, int] = Field(description="device id → new desired-state generation")
    published: bool | None = Field(default=None, description="None when the hub runs without a broker")
    publish_errors: list[str] = Field(default_factory=list)


class DeviceServiceState(_Answer):
    """A service on one device: its state there, why, and where it answers."""

    device_id: str
    online: bool
    last_seen: datetime | None = Field(default=None, description="its last message to the hub; None: never")
    state: StateOnDevice = Field(
        default=StateOnDevice.PENDING, description="Pending until the device reported it"
    )
    reason: str | None = Field(default=None, description="one line, e.g. the cause of a failure")
    failure: FailureDetail | None = Field(
        default=None, description="while Failed: the failed version's traceback and log tail"
    )
    endpoint: str | None = Field(default=None, description="e.g. http://10.0.0.5:8890, as the device reports")
    serving_version: str | None = None
    progress: Progress | None = Field(default=None, description="a download or pull under way")
    generation: int | None = Field(default=None, description="the desired-state generation reported on")

    @field_validator("state", mode="before")
    @classmethod
    def _pending_when_unnamed(cls, value: Any) -> Any:
        # A hub from before the word Pending sent null for a device that had not reported.
        return StateOnDevice.PENDING if value is None else value

    @property
    def final(self) -> bool:
        """Healthy or Failed: nothing will change without a new deployment."""
        return self.state.final

    @property
    def offline_text(self) -> str:
        """``edge-2 is offline (last seen 2026-12-07 12:01:03 UTC)``: what is said of a device
        that cannot take a change now (it gets it when its agent reconnects)."""
        return f"{self.device_id} is offline (last seen {seen_text(self.last_seen)})"

    def final_for(self, issued: int | None) -> bool:
        """Final, and about generation ``issued`` (a change's) or a later one: a device's
        report on an earlier generation is the state from before the change."""
        if issued is not None and self.generation is not None and self.generation < issued:
            return False
        return self.final


def seen_text(last_seen: datetime | None) -> str:
    """When a device was last heard from: ``2026-12-07 12:01:03 UTC``, or ``never``."""
    if last_seen is None:
        return "never"
    aware = last_seen if last_seen.tzinfo is not None else last_seen.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class ServiceRecord(_Answer):
    """A deployed service: its module, settings, target and rolled-up state."""

    name: str
    module: str
    version: str
    manifest_digest: str
    settings: DeploymentSettings
    target: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    state: ServiceState
    devices: list[DeviceServiceState] = Field(default_factory=list)
    #: the last deploy's rollout when it had waves (``rollout["status"]`` is one line)
    rollout: dict[str, Any] | None = None


class Deployed(FleetChange):
    """The answer to a deployment: the service as it now stands and what it changed."""

    created: bool
    deployment: ServiceRecord
    warnings: list[str] = Field(default_factory=list)


class RolledBack(FleetChange):
    """The answer to a rollback: the version the service runs now, and the service."""

    version: str
    deployment: ServiceRecord


class ServiceKeys(_Answer):
    """The endpoint keys of a service deployed with ``auth_enabled``: callers send one as
    ``Authorization: Bearer KEY``; devices hold only their hashes."""

    primary: str
    secondary: str


class KeysRegenerated(FleetChange):
    """A service's keys after one was replaced, and the desired states that re-issued."""

    keys: ServiceKeys


class DeviceRecord(_Answer):
    """An enrolled device as the hub knows it."""

    id: str
    tags: dict[str, str] = Field(default_factory=dict)
    revoked: bool = False
    online: bool = False
    last_seen: datetime | None = None
    agent_version: str | None = None
    created_at: datetime
    generation: int = 0
    services: list[str] = Field(default_factory=list)


class ServiceOnDevice(_Answer):
    """A service assigned to a device, with its state there (Pending until reported)."""

    service: str
    state: StateOnDevice
    reason: str | None = None


class CredentialsState(_Answer):
    """A device's credentials: rotations done, its broker user, a rotation in flight."""

    generation: int = 0
    mqtt_username: str
    rotated_at: datetime | None = None
    rotation_requested: datetime | None = None
    rotation_stage: str | None = Field(default=None, description="requested, or both-valid")


class DeviceDetail(DeviceRecord):
    """A device with its desired-state times, its last error and each module's reported state."""

    desired_issued: datetime | None = None
    desired_expires: datetime | None = None
    applied_generation: int | None = None
    last_error: str | None = None
    modules: list[ModuleStatus] = Field(default_factory=list)
    state: str | None = Field(
        default=None, description="the worst of its services' states, or Idle (None: an older hub)"
    )
    service_states: list[ServiceOnDevice] = Field(default_factory=list)
    credentials: CredentialsState | None = Field(default=None, description="None: an older hub")


class ServiceLogs(_Answer):
    """A module's last log lines on one device."""

    device_id: str
    service: str
    lines: list[str]
    truncated: bool = False
    failed: bool = Field(default=False, description="the log the last failed instance left")
    version: str | None = Field(default=None, description="the module version the lines are from")
    failed_version: str | None = Field(
        default=None, description="a failed version left a log on the device (get it with failed=True)"
    )


class WebhookRecord(_Answer):
    """A webhook subscription: its URL, the CloudEvents types it wants (none: all) and its
    filters (``service``, ``device``). ``secret`` is set only in the answer to its creation."""

    id: str
    url: str
    events: list[str]
    filters: dict[str, str]
    created_at: datetime
    secret: str | None = None


class DeadLetter(_Answer):
    """A delivery the hub gave up on after retrying for its maximum age."""

    id: int
    event_id: int
    message_id: str
    subject: str
    attempts: int
    created_at: datetime
    last_error: str | None
