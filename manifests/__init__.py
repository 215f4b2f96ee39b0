"""edgepack contracts: every document that crosses a process boundary. Pure, no I/O."""

from manifests.azureml import DeploymentConfig, InferenceConfig, parse_config
from manifests.canonical import canonical_json
from manifests.desired import (
    DeploymentSettings,
    DesiredState,
    HealthProbe,
    ModuleAssignment,
    RestartPolicy,
    RuntimeKind,
    check_desired,
)
from manifests.digests import sha256_digest
from manifests.errors import ConfigError, EdgepackError, FetchError, RuntimeFailure, TrustError
from manifests.module import FileEntry, ModuleManifest, Resources, Runtime
from manifests.reported import ModuleMetrics, ModuleStatus, ReportedState, Telemetry
from manifests.signing import Envelope, Signature, TrustStore
from manifests.states import ServiceState

__all__ = [
    "ConfigError",
    "DeploymentConfig",
    "DeploymentSettings",
    "DesiredState",
    "EdgepackError",
    "Envelope",
    "FetchError",
    "FileEntry",
    "HealthProbe",
    "InferenceConfig",
    "ModuleAssignment",
    "ModuleManifest",
    "ModuleMetrics",
    "ModuleStatus",
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
    "canonical_json",
    "check_desired",
    "parse_config",
    "sha256_digest",
]
