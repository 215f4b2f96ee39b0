"""JSON Schema for every contract, generated from the pydantic models.

``scripts/gen_schemas.py`` writes them into ``manifests/schemas/``; a test fails when the
files drift from the models.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from manifests.azureml import DeploymentConfig, InferenceConfig
from manifests.desired import DesiredState
from manifests.device import AgentConfig, DeviceCredentials
from manifests.join import JoinAnswer, JoinRequest
from manifests.logs import LogRequest, LogResponse
from manifests.module import ModuleManifest
from manifests.reported import ReportedState, Telemetry
from manifests.signing import Envelope, TrustStore

CONTRACTS: dict[str, type[BaseModel]] = {
    "module": ModuleManifest,
    "envelope": Envelope,
    "trust-store": TrustStore,
    "inferenceconfig": InferenceConfig,
    "deploymentconfig": DeploymentConfig,
    "desired-state": DesiredState,
    "reported-state": ReportedState,
    "telemetry": Telemetry,
    "device-credentials": DeviceCredentials,
    "agent-config": AgentConfig,
    "logs-request": LogRequest,
    "logs-response": LogResponse,
    "join-request": JoinRequest,
    "join-answer": JoinAnswer,
}


def all_schemas() -> dict[str, dict[str, Any]]:
    """File stem → JSON Schema (validation mode, by alias, as documents appear on the wire)."""
    return {
        name: model.model_json_schema(by_alias=True, mode="validation")
        for name, model in CONTRACTS.items()
    }
