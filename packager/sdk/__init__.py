"""The edgepack Python SDK: the hub's registry, devices and services, as Azure ML's SDK has them.

Users import it as ``edgepack`` (the top-level package re-exports these names)::

    from edgepack import Hub, Model, InferenceConfig, DeploymentConfig, Selector

    hub = Hub.from_config(target=Selector("site=berlin"))
    model = Model.register(hub, model_path="digits.onnx", model_name="digits")
    service = Model.deploy(hub, "digits-svc", [model], InferenceConfig(entry_script="score.py"),
                           DeploymentConfig(port=8890))
    service.wait_for_deployment(show_output=True)
    print(service.state, service.run({"data": [[0.0] * 64]}))

``docs/azure-ml-sdk.md`` maps every Azure ML call of the deployment workflow to its
counterpart here. The CLI (``edgepack …``) is built on this package.
"""

from __future__ import annotations

from manifests.errors import (
    ConfigError,
    EdgepackError,
    FetchError,
    HubUnavailable,
    ModuleStartFailure,
    RuntimeFailure,
    TrustError,
)
from manifests.rollout import RolloutSpec
from manifests.states import ServiceState, StateOnDevice
from packager.sdk.alerts import Alert, AlertRule, Alerts
from packager.sdk.answers import (
    DeadLetter,
    Deleted,
    DeviceDetail,
    DeviceRecord,
    DeviceServiceState,
    FileRecord,
    FleetChange,
    KeysRegenerated,
    ModelRecord,
    ModuleDetail,
    ModuleRecord,
    ModuleSigners,
    PushResult,
    RolledBack,
    ServiceKeys,
    ServiceLogs,
    ServiceRecord,
    SignerChange,
    WebhookRecord,
)
from packager.sdk.configs import DeploymentConfig, InferenceConfig
from packager.sdk.data import DataDownload, DataListing, delete_service_data, download_service_data
from packager.sdk.device import Device, save_credentials
from packager.sdk.environment import CondaDependencies, Environment
from packager.sdk.errors import (
    BadArgument,
    DeploymentFailed,
    DeploymentTimeout,
    DevicesOffline,
    HubConflict,
    HubDeviceOffline,
    HubError,
    HubFailure,
    HubForbidden,
    HubNotFound,
    HubRejected,
    HubTrustRefusal,
    HubUnauthorized,
    ScoringRunFailed,
    ServiceExists,
)
from packager.sdk.hub import Hub
from packager.sdk.local import LocalService
from packager.sdk.model import Model
from packager.sdk.module import BuiltModule, Module
from packager.sdk.progress import ProgressCallback, ProgressEvent, RichBars
from packager.sdk.rollout import Rollout
from packager.sdk.service import Service
from packager.sdk.targets import Devices, Selector
from packager.sdk.webhook import Webhook
from packager.sdk.webservice import AciWebservice, AksWebservice, LocalWebservice, Webservice

__all__ = [
    "AciWebservice",
    "AksWebservice",
    "Alert",
    "AlertRule",
    "Alerts",
    "BadArgument",
    "BuiltModule",
    "CondaDependencies",
    "ConfigError",
    "DataDownload",
    "DataListing",
    "DeadLetter",
    "Deleted",
    "DeploymentConfig",
    "DeploymentFailed",
    "DeploymentTimeout",
    "Device",
    "DeviceDetail",
    "DeviceRecord",
    "DeviceServiceState",
    "Devices",
    "DevicesOffline",
    "EdgepackError",
    "Environment",
    "FetchError",
    "FileRecord",
    "FleetChange",
    "Hub",
    "HubConflict",
    "HubDeviceOffline",
    "HubError",
    "HubFailure",
    "HubForbidden",
    "HubNotFound",
    "HubRejected",
    "HubTrustRefusal",
    "HubUnauthorized",
    "HubUnavailable",
    "InferenceConfig",
    "KeysRegenerated",
    "LocalService",
    "LocalWebservice",
    "Model",
    "ModelRecord",
    "Module",
    "ModuleDetail",
    "ModuleRecord",
    "ModuleSigners",
    "ModuleStartFailure",
    "ProgressCallback",
    "ProgressEvent",
    "PushResult",
    "RichBars",
    "RolledBack",
    "Rollout",
    "RolloutSpec",
    "RuntimeFailure",
    "ScoringRunFailed",
    "Selector",
    "Service",
    "ServiceExists",
    "ServiceKeys",
    "ServiceLogs",
    "ServiceRecord",
    "ServiceState",
    "SignerChange",
    "StateOnDevice",
    "TrustError",
    "Webhook",
    "WebhookRecord",
    "Webservice",
    "delete_service_data",
    "download_service_data",
    "save_credentials",
]
