"""edgepack contracts: every document that crosses a process boundary. Pure, no I/O."""

from manifests.azureml import DeploymentConfig, InferenceConfig, parse_config
from manifests.canonical import canonical_json
from manifests.desired import (
    DeploymentSettings,
    DesiredRefusal,
    DesiredState,
    DesiredStateRefused,
    HealthProbe,
    ModuleAssignment,
    RestartPolicy,
    RuntimeKind,
    check_desired,
    verify_desired,
)
from manifests.device import AgentConfig, DeviceCredentials, parse_agent_config, parse_credentials
from manifests.digests import sha256_digest
from manifests.errors import (
    BrokerUnavailable,
    ConfigError,
    EdgepackError,
    FetchError,
    HubUnavailable,
    ImageUnavailable,
    ModuleStartFailure,
    NotFoundError,
    RegistryUnavailable,
    RuntimeFailure,
    TrustError,
    Unschedulable,
)
from manifests.logs import LogRequest, LogResponse
from manifests.module import FileEntry, ModuleManifest, Resources, Runtime
from manifests.reported import ModuleMetrics, ModuleStatus, Progress, ReportedState, Telemetry
from manifests.signing import Envelope, Signature, TrustStore
from manifests.states import ServiceState

__all__ = [
    "AgentConfig",
    "BrokerUnavailable",
    "ConfigError",
    "DeploymentConfig",
    "DeploymentSettings",
    "DesiredRefusal",
    "DesiredState",
    "DesiredStateRefused",
    "DeviceCredentials",
    "EdgepackError",
    "Envelope",
    "FetchError",
    "FileEntry",
    "HealthProbe",
    "HubUnavailable",
    "ImageUnavailable",
    "InferenceConfig",
    "LogRequest",
    "LogResponse",
    "ModuleAssignment",
    "ModuleManifest",
    "ModuleMetrics",
    "ModuleStartFailure",
    "ModuleStatus",
    "NotFoundError",
    "Progress",
    "RegistryUnavailable",
    "ReportedState",
    "Resources",
    "RestartPolicy",
    "Runtime",
    "RuntimeFailure",
    "RuntimeKind",
    "ServiceState",
    "Signature",
    "Telemetry",
    "TrustError",
    "TrustStore",
    "Unschedulable",
    "canonical_json",
    "check_desired",
    "parse_agent_config",
    "parse_config",
    "parse_credentials",
    "sha256_digest",
    "verify_desired",
]
