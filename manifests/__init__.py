"""edgepack contracts: every document that crosses a process boundary. Pure, no I/O.

The names below are re-exported lazily (PEP 562): importing one contract module, as the
device agent does, does not load every other one (the agent counts its megabytes).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AgentConfig": "manifests.device",
    "BrokerUnavailable": "manifests.errors",
    "ConfigError": "manifests.errors",
    "DeploymentConfig": "manifests.azureml",
    "DeploymentSettings": "manifests.desired",
    "DesiredRefusal": "manifests.desired",
    "DesiredState": "manifests.desired",
    "DesiredStateRefused": "manifests.desired",
    "DeviceCredentials": "manifests.device",
    "EdgepackError": "manifests.errors",
    "Envelope": "manifests.signing",
    "FetchError": "manifests.errors",
    "FileEntry": "manifests.module",
    "HealthProbe": "manifests.desired",
    "HubUnavailable": "manifests.errors",
    "ImageUnavailable": "manifests.errors",
    "InferenceConfig": "manifests.azureml",
    "LogRequest": "manifests.logs",
    "LogResponse": "manifests.logs",
    "ModuleAssignment": "manifests.desired",
    "ModuleManifest": "manifests.module",
    "ModuleMetrics": "manifests.reported",
    "ModuleStartFailure": "manifests.errors",
    "ModuleStatus": "manifests.reported",
    "NotFoundError": "manifests.errors",
    "Progress": "manifests.reported",
    "RegistryUnavailable": "manifests.errors",
    "ReportedState": "manifests.reported",
    "Resources": "manifests.module",
    "RestartPolicy": "manifests.desired",
    "Runtime": "manifests.module",
    "RuntimeFailure": "manifests.errors",
    "RuntimeKind": "manifests.desired",
    "ServiceState": "manifests.states",
    "Signature": "manifests.signing",
    "Telemetry": "manifests.reported",
    "TrustError": "manifests.errors",
    "TrustStore": "manifests.signing",
    "Unschedulable": "manifests.errors",
    "canonical_json": "manifests.canonical",
    "check_desired": "manifests.desired",
    "parse_agent_config": "manifests.device",
    "parse_config": "manifests.azureml",
    "parse_credentials": "manifests.device",
    "sha256_digest": "manifests.digests",
    "verify_desired": "manifests.desired",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'manifests' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
