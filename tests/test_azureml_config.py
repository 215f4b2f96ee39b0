"""Azure ML v1 inferenceconfig.json / deploymentconfig.json: accepted as written, typos caught."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from manifests.azureml import DeploymentConfig, InferenceConfig, parse_config
from manifests.desired import RestartPolicy, RuntimeKind
from manifests.errors import ConfigError
from packager.files import load_json_file

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "packager" / "templates"
EXAMPLE = REPO / "examples" / "digits"

# As the v1 CLI reference documents them for ACI and AKS, keys Azure-only included.
ACI_DEPLOYMENT = {
    "computeType": "ACI",
    "containerResourceRequirements": {"cpu": 1, "memoryInGB": 1.5, "gpu": 0},
    "authEnabled": True,
    "sslEnabled": False,
    "sslCertificate": None,
    "sslKey": None,
    "cname": None,
    "dnsNameLabel": "digits-aci",
    "appInsightsEnabled": True,
    "location": "westeurope",
    "description": "digits on ACI",
    "tags": {"team": "vision"},
}
AKS_DEPLOYMENT = {
    "computeType": "aks",
    "autoScaler": {
        "autoscaleEnabled": True,
        "minReplicas": 1,
        "maxReplicas": 3,
        "refreshPeriodInSeconds": 10,
        "targetUtilization": 70,
    },
    "authEnabled": True,
    "tokenAuthEnabled": False,
    "containerResourceRequirements": {
        "cpu": 0.5,
        "memoryInGB": 1,
        "cpuLimit": 2,
        "memoryInGBLimit": 2,
    },
    "livenessProbeRequirements": {
        "periodSeconds": 5,
        "initialDelaySeconds": 20,
        "timeoutSeconds": 3,
        "failureThreshold": 4,
        "successThreshold": 1,
    },
    "scoringTimeoutMs": 60000,
    "maxConcurrentRequestsPerContainer": 1,
    "maxQueueWaitMs": 500,
    "numReplicas": 2,
    "namespace": "ml",
    "computeTargetName": "aks-cluster",
    "gpuCores": 0,
}
ENVIRONMENT_INFERENCE = {
    "entryScript": "score.py",
    "sourceDirectory": "src",
    "environment": {
        "name": "digits-env",
        "version": "3",
        "inferencingStackVersion": "latest",
        "environmentVariables": {"LOG_LEVEL": "debug"},
        "docker": {
            "enabled": True,
            "baseImage": "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04",
            "baseDockerfile": None,
            "sharedVolumes": True,
            "shmSize": "2g",
            "arguments": [],
            "baseImageRegistry": {"address": None, "username": None, "password": None},
        },
        "python": {
            "userManagedDependencies": False,
            "interpreterPath": "python",
            "condaDependenciesFile": None,
            "baseCondaEnvironment": None,
            "condaDependencies": {
                "name": "project_environment",
                "channels": ["conda-forge"],
                "dependencies": [
                    "python=3.11",
                    {"pip": ["onnxruntime>=1.18", "numpy", "azureml-defaults"]},
                ],
            },
        },
        "spark": {"repositories": [], "packages": [], "precachePackages": True},
        "databricks": {"mavenLibraries": [], "pypiLibraries": []},
        "r": None,
    },
}
LEGACY_INFERENCE = {
    "entryScript": "score.py",
    "runtime": "python",
    "condaFile": "myenv.yml",
    "extraDockerfileSteps": None,
    "sourceDirectory": None,
    "enableGpu": False,
    "baseImage": "myregistry.azurecr.io/base:1",
    "baseImageRegistry": {"address": "myregistry.azurecr.io", "username": "u", "password": "p"},
    "cudaVersion": None,
    "schemaFile": None,
    "description": "legacy form",
}


def ic(data: dict[str, Any]) -> InferenceConfig:
    return parse_config(InferenceConfig, data, source="inferenceconfig.json")


def dc(data: dict[str, Any]) -> DeploymentConfig:
    return parse_config(DeploymentConfig, data, source="deploymentconfig.json")


@pytest.mark.parametrize("folder", [TEMPLATES, EXAMPLE], ids=["templates", "example"])
def test_shipped_configs_parse(folder: Path) -> None:
    inference = parse_config(
        InferenceConfig, load_json_file(folder / "inferenceconfig.json"), source="ic"
    )
    deployment = parse_config(
        DeploymentConfig, load_json_file(folder / "deploymentconfig.json"), source="dc"
    )
    assert inference.entry_script == "score.py"
    assert inference.pip_requirements() == ["onnxruntime", "numpy"]
    assert deployment.port == 8890


def test_documented_environment_form_is_accepted() -> None:
    config = ic(ENVIRONMENT_INFERENCE)
    assert config.source_directory == "src"
    assert config.pip_requirements() == ["onnxruntime>=1.18", "numpy", "azureml-defaults"]
    assert config.environment_variables() == {"LOG_LEVEL": "debug"}
    assert config.docker_image() == "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04"


def test_legacy_inference_keys_are_accepted() -> None:
    config = ic(LEGACY_INFERENCE)
    assert config.conda_file == "myenv.yml"
    assert config.runtime == "python"
    assert config.docker_image() == "myregistry.azurecr.io/base:1"
    assert config.pip_requirements() == []


@pytest.mark.parametrize("data", [ACI_DEPLOYMENT, AKS_DEPLOYMENT], ids=["aci", "aks"])
def test_documented_aci_and_aks_deployment_configs_are_accepted(data: dict[str, Any]) -> None:
    config = dc(data)
    assert config.compute_type.lower() in ("aci", "aks")


def test_autoscaler_accepts_both_spellings_azure_uses() -> None:
    lower = dc({"autoscaler": {"minReplicas": 2}})
    upper = dc({"autoScaler": {"minReplicas": 2}})
    assert lower.autoscaler is not None and upper.autoscaler is not None
    assert lower.autoscaler.min_replicas == upper.autoscaler.min_replicas == 2


@pytest.mark.parametrize(
    ("parse", "data", "field", "hint"),
    [
        (ic, {"entryScipt": "score.py"}, "entryScipt", "entryScript"),
        (ic, {"entryScript": "s.py", "sourceDirectroy": "."}, "sourceDirectroy", "sourceDirectory"),
        (
            ic,
            {"entryScript": "s.py", "environment": {"docker": {"baseImge": "x"}}},
            "environment.docker.baseImge",
            "baseImage",
        ),
        (
            dc,
            {"containerResourceRequirements": {"cpu": 1, "memoryInGb": 1}},
            "containerResourceRequirements.memoryInGb",
            "memoryInGB",
        ),
        (dc, {"computeTyp": "local"}, "computeTyp", "computeType"),
        (dc, {"autoScaler": {"maxReplica": 3}}, "autoScaler.maxReplica", "maxReplicas"),
        (dc, {"edgepack": {"runtme": "process"}}, "edgepack.runtme", "runtime"),
    ],
)
def test_typo_is_one_line_naming_file_field_and_the_likely_key(
    parse: Any, data: dict[str, Any], field: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse(data)
    message = str(err.value)
    assert "\n" not in message
    assert message.endswith(f"unknown field '{field}'; did you mean '{hint}'?")
    assert message.split(":")[0] in ("inferenceconfig.json", "deploymentconfig.json")


def test_unknown_key_with_no_near_match_has_no_hint() -> None:
    with pytest.raises(ConfigError) as err:
        dc({"frobnicate": 1})
    assert str(err.value) == "deploymentconfig.json: unknown field 'frobnicate'"


@pytest.mark.parametrize(
    ("parse", "data", "field"),
    [
        (dc, {"port": "eighty"}, "port"),
        (dc, {"port": 70000}, "port"),
        (dc, {"computeType": "kubernetes"}, "computeType"),
        (dc, {"containerResourceRequirements": {"cpu": -1}}, "containerResourceRequirements.cpu"),
        (dc, {"sslEnabled": "sometimes"}, "sslEnabled"),
        (dc, {"edgepack": {"runtime": "vm"}}, "edgepack.runtime"),
        (ic, {"entryScript": 5}, "entryScript"),
        (ic, {"entryScript": "s.py", "environment": {"environmentVariables": []}}, None),
    ],
)
def test_wrong_types_name_the_field(parse: Any, data: dict[str, Any], field: str | None) -> None:
    with pytest.raises(ConfigError) as err:
        parse(data)
    message = str(err.value)
    assert "\n" not in message
    assert f"field '{field or 'environment.environmentVariables'}'" in message


def test_missing_entry_script_is_named() -> None:
    with pytest.raises(ConfigError, match="missing required field 'entryScript'"):
        ic({"sourceDirectory": "."})


def test_top_level_must_be_an_object() -> None:
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ic(json.loads("[1, 2]"))


def test_to_settings_defaults() -> None:
    settings = dc({}).to_settings()
    assert settings.port == 8890
    assert settings.runtime is None, "unset: each device picks a runtime it has"
    assert dc({"edgepack": {"runtime": "docker"}}).to_settings().runtime is RuntimeKind.DOCKER
    assert settings.restart_policy is RestartPolicy.ALWAYS
    assert settings.workers == 1
    assert settings.cpu is None and settings.memory_mb is None
    assert settings.health.path == "/healthz"


def test_to_settings_maps_resources_probe_and_extension() -> None:
    config = dc(
        {
            **AKS_DEPLOYMENT,
            "port": 9001,
            "edgepack": {
                "runtime": "process",
                "workers": 4,
                "restartPolicy": "on-failure",
                "environmentVariables": {"MODE": "fast"},
                "healthPath": "/ready",
            },
        }
    )
    settings = config.to_settings()
    assert settings.port == 9001
    assert settings.runtime is RuntimeKind.PROCESS
    assert settings.workers == 4
    assert settings.restart_policy is RestartPolicy.ON_FAILURE
    assert settings.env == {"MODE": "fast"}
    # The limits win over the requests: they are what the container may use.
    assert settings.cpu == 2
    assert settings.memory_mb == 2048
    assert settings.health.path == "/ready"
    assert settings.health.period_s == 5
    assert settings.health.initial_delay_s == 20
    assert settings.health.timeout_s == 3
    assert settings.health.failure_threshold == 4


def test_to_settings_caps_azures_long_initial_delay() -> None:
    config = dc({"livenessProbeRequirements": {"initialDelaySeconds": 3600}})
    assert config.to_settings().health.initial_delay_s == 600


def test_to_settings_uses_requests_without_limits() -> None:
    settings = dc({"containerResourceRequirements": {"cpu": 0.25, "memoryInGB": 0.5}}).to_settings(
        default_port=7000
    )
    assert (settings.cpu, settings.memory_mb, settings.port) == (0.25, 512, 7000)


def test_malformed_json_file_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "deploymentconfig.json"
    path.write_text('{\n  "computeType": "local",\n  "port": 8890,\n}\n')
    with pytest.raises(ConfigError) as err:
        load_json_file(path)
    assert str(err.value).startswith(f"{path}:4:1: invalid JSON")


def test_body_limits_come_from_the_edgepack_object_with_small_defaults() -> None:
    limits = dc({}).to_settings().limits
    assert (limits.max_body_bytes, limits.max_body_bytes_in_flight) == (8 << 20, None)
    given = {"edgepack": {"maxBodyBytes": 2_000_000, "maxBodyBytesInFlight": 5_000_000}}
    limits = dc(given).to_settings().limits
    assert (limits.max_body_bytes, limits.max_body_bytes_in_flight) == (2_000_000, 5_000_000)


@pytest.mark.parametrize(
    ("edgepack", "expected"),
    [
        ({"maxBodyBytes": 0}, "field 'edgepack.maxBodyBytes'"),
        ({"maxBodyBytes": 2 << 30}, "field 'edgepack.maxBodyBytes'"),
        ({"maxBodyBytes": "8MB"}, "field 'edgepack.maxBodyBytes'"),
        ({"maxBodyBytesInFlight": 17 << 30}, "field 'edgepack.maxBodyBytesInFlight'"),
        # Below the default body limit: no request of 8 MiB could ever be taken.
        ({"maxBodyBytesInFlight": 1_000_000}, "maxBodyBytesInFlight (1000000) is less than maxBodyBytes"),
        (
            {"maxBodyBytes": 4_000_000, "maxBodyBytesInFlight": 3_999_999},
            "is less than maxBodyBytes (4000000)",
        ),
    ],
)
def test_body_limits_out_of_bounds_are_refused_in_one_line(edgepack: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        dc({"edgepack": edgepack})
    assert "\n" not in str(err.value)
    assert expected in str(err.value)


def test_data_collection_is_off_unless_azure_storage_is_enabled() -> None:
    off = parse_config(DeploymentConfig, {"dataCollection": {"storageEnabled": False}}, source="d.json")
    assert off.to_settings().data_collection is None
    assert parse_config(DeploymentConfig, {}, source="d.json").to_settings().data_collection is None


def test_data_collection_defaults_to_every_call_as_azure_and_takes_edgepack_tuning() -> None:
    on = parse_config(DeploymentConfig, {"dataCollection": {"storageEnabled": True}}, source="d.json")
    collection = on.to_settings().data_collection
    assert collection is not None and collection.sample_rate == 1.0 and collection.spool_quota_mb == 256
    tuned = parse_config(
        DeploymentConfig,
        {
            "dataCollection": {"storageEnabled": True},
            "edgepack": {"dataCollection": {"sampleRate": 0.05, "spoolQuotaMB": 16}},
        },
        source="d.json",
    ).to_settings()
    assert tuned.data_collection is not None
    assert (tuned.data_collection.sample_rate, tuned.data_collection.spool_quota_mb) == (0.05, 16)


_ON = {"storageEnabled": True}


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"edgepack": {"dataCollection": {"sampleRate": 0.5}}}, "storageEnabled"),
        ({"dataCollection": _ON, "edgepack": {"dataCollection": {"sampleRate": 0}}}, "sampleRate"),
        ({"dataCollection": _ON, "edgepack": {"dataCollection": {"sampleRate": 1.5}}}, "sampleRate"),
        ({"dataCollection": _ON, "edgepack": {"dataCollection": {"spoolQuotaMB": 10**9}}}, "spoolQuotaMB"),
    ],
)
def test_bad_data_collection_settings_are_one_line_errors(data: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(DeploymentConfig, data, source="d.json")
    assert says in str(err.value) and "\n" not in str(err.value)
