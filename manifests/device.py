"""A device's own documents: the credentials ``edgepack device enroll`` writes, and the
agent's configuration (``agent.toml``) that ``edgepack agent init`` writes.

The credentials hold everything a device needs to trust and reach its hub: the hub's key
(which signs desired states) and the **publisher keys the hub trusted at enrolment**, which
sign modules. The agent checks every module against its own copy of the publisher keys, so a
compromised hub, or a desired state naming a manifest no trusted publisher signed, runs
nothing. Parsing is pure: callers read the files and pass the bytes.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path, PurePath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from manifests.desired import DEVICE_ID_PATTERN, RuntimeKind
from manifests.errors import ConfigError
from manifests.signing import TrustedKey, TrustStore
from manifests.validation import describe_validation_error

CREDENTIALS_SCHEMA = "edgepack.device-credentials/v1"
TOPIC_PREFIX_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_/-]{0,127}$"


class MqttEndpoint(BaseModel):
    """Where the device's broker is and the account the hub made for this device."""

    model_config = ConfigDict(extra="forbid")

    host: str | None = Field(
        default=None, max_length=253, description="broker host; none: the device polls over HTTP"
    )
    port: int = Field(default=1883, ge=1, le=65535)
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=256)
    topic_prefix: str = Field(default="edgepack", pattern=TOPIC_PREFIX_PATTERN)
    tls: bool = Field(default=False, description="connect with TLS, verified against ca_pem")


class DeviceCredentials(BaseModel):
    """``edge-1.json``: written once at enrolment (mode 0600), read by the agent."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["edgepack.device-credentials/v1"] = Field(
        default="edgepack.device-credentials/v1", alias="schema"
    )
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    hub_url: str = Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$", max_length=2048)
    token: str = Field(min_length=16, max_length=256, description="the device's HTTP token")
    mqtt: MqttEndpoint
    hub_key: TrustedKey = Field(description="the key that signs this device's desired states")
    publishers: TrustStore = Field(
        description="publisher keys the hub trusted at enrolment; modules must be signed by them"
    )
    ca_pem: str | None = Field(
        default=None,
        max_length=64 * 1024,
        description="PEM CA certificate(s) for the hub's HTTPS and the broker's TLS",
    )

    @model_validator(mode="after")
    def _keys_match_their_ids(self) -> DeviceCredentials:
        # A key id that is not the key's own would make every check fail later, far from here.
        try:
            self.hub_trust().public_keys()
            self.publishers.public_keys()
        except (ConfigError, ValueError) as exc:
            raise ValueError(f"a trusted key does not match its key id ({exc})") from None
        return self

    def hub_trust(self) -> TrustStore:
        return TrustStore(keys=[self.hub_key])


class DockerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        default=None, description="Docker Engine URL; default: DOCKER_HOST or the local socket"
    )
    pull_timeout_s: float = Field(default=900, gt=0, le=86400)
    stop_timeout_s: float = Field(default=15, gt=0, le=600)


class ProcessSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    python: Path | None = Field(
        default=None, description="interpreter that runs modules; default: the agent's own"
    )


class RestartSettings(BaseModel):
    """How a module that crashed or stopped answering its probe is restarted."""

    model_config = ConfigDict(extra="forbid")

    base_s: float = Field(default=1.0, gt=0, le=60, description="first delay; doubles each time")
    cap_s: float = Field(default=300.0, gt=0, le=3600)
    jitter: float = Field(default=0.2, ge=0, le=0.5, description="+- this fraction of the delay")
    reset_after_s: float = Field(default=600.0, gt=0, le=86400, description="healthy this long: forgiven")
    crash_loop_limit: int = Field(default=5, ge=1, le=100, description="failures in a row reported Failed")
    settle_s: float = Field(
        default=10.0, ge=0, le=3600, description="a new version healthy this long: the one it replaced stops"
    )


LogLevel = Literal["debug", "info", "warning", "error"]


class AgentConfig(BaseModel):
    """``agent.toml``. Relative paths are taken from the file's own folder."""

    model_config = ConfigDict(extra="forbid")

    credentials: Path
    state_dir: Path
    runtimes: list[RuntimeKind] = Field(min_length=1, max_length=2)
    log_level: LogLevel = "info"
    log_format: Literal["json", "text"] = "json"
    service_host: str = Field(
        default="0.0.0.0", max_length=253, description="address module endpoints listen on"
    )
    advertise_host: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[A-Za-z0-9.:\[\]-]+$",
        description="host clients reach this device's modules at (reported to the hub); "
        "default: service_host, or the device's host name when that is a wildcard",
    )
    telemetry_interval_s: float = Field(default=10, ge=1, le=3600)
    report_interval_s: float = Field(default=60, ge=1, le=3600)
    poll_interval_s: float = Field(
        default=300, ge=1, le=86400, description="HTTP check for a new desired state (besides MQTT)"
    )
    max_log_bytes: int = Field(
        default=8 << 20,
        ge=64 << 10,
        le=1 << 30,
        description="a module's log (process runtime) is rotated past this",
    )
    failed_log_max_bytes: int = Field(
        default=256 << 10,
        ge=16 << 10,
        le=512 << 10,
        description="the newest output of each service's last failed instance kept on the device "
        "(edgepack service logs --failed)",
    )
    docker: DockerSettings = Field(default_factory=DockerSettings)
    process: ProcessSettings = Field(default_factory=ProcessSettings)
    restart: RestartSettings = Field(default_factory=RestartSettings)

    @field_validator("runtimes")
    @classmethod
    def _unique(cls, v: list[RuntimeKind]) -> list[RuntimeKind]:
        if len(set(v)) != len(v):
            raise ValueError("a runtime is listed twice")
        return v

    def resolved(self, base_dir: PurePath) -> AgentConfig:
        """The same config with relative paths taken from ``base_dir``."""

        def absolute(p: Path) -> Path:
            return p if p.is_absolute() else Path(base_dir) / p

        process = self.process
        if process.python is not None:
            process = process.model_copy(update={"python": absolute(process.python)})
        return self.model_copy(
            update={
                "credentials": absolute(self.credentials),
                "state_dir": absolute(self.state_dir),
                "process": process,
            }
        )


def parse_credentials(data: bytes, *, source: str) -> DeviceCredentials:
    """Device credentials from the bytes of an enrolment file; :class:`ConfigError` otherwise."""
    try:
        return DeviceCredentials.model_validate_json(data)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise ConfigError(
                f"{source}: not valid JSON; use the file 'edgepack device enroll --out' wrote"
            ) from None
        raise ConfigError(
            describe_validation_error(exc, source=source, model=DeviceCredentials)
            + "; enroll the device again with 'edgepack device enroll --out FILE'"
        ) from None


def parse_agent_config(data: bytes, *, source: str, base_dir: PurePath) -> AgentConfig:
    """``agent.toml`` from its bytes, with relative paths resolved against ``base_dir``."""
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    try:
        return AgentConfig.model_validate(raw).resolved(base_dir)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source=source, model=AgentConfig)) from None


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)


def render_agent_config(config: AgentConfig) -> str:
    """``agent.toml`` text for ``config`` (``parse_agent_config`` reads it back unchanged)."""
    data = config.model_dump(mode="json", exclude_none=True)
    lines = ["# edgepack agent configuration (edgepack agent init); see docs/agent.md\n"]
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{key} = {_toml_value(value)}\n")
    for name, table in tables.items():
        lines.append(f"\n[{name}]\n")
        lines.extend(f"{key} = {_toml_value(value)}\n" for key, value in table.items())
    return "".join(lines)
