"""The SDK's configurations are the JSON files' contracts in Python, and hub error answers map
to one class each: pure checks, no hub needed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pytest

from manifests.azureml import DeploymentConfig as DeploymentDocument
from manifests.azureml import parse_config
from packager.sdk import (
    AciWebservice,
    AksWebservice,
    BadArgument,
    CondaDependencies,
    DeploymentConfig,
    Devices,
    Environment,
    HubError,
    HubFailure,
    HubNotFound,
    HubRejected,
    HubTrustRefusal,
    HubUnauthorized,
    InferenceConfig,
    LocalWebservice,
    Selector,
)
from packager.sdk.errors import hub_error
from tests.conftest import EXAMPLE


def test_keywords_make_the_file_a_deploymentconfig_json_would_be() -> None:
    config = DeploymentConfig(port=8891, cpu_cores=0.5, memory_gb=0.25, runtime="process", period_seconds=5)
    document = {
        "computeType": "local",
        "port": 8891,
        "containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 0.25},
        "livenessProbeRequirements": {"periodSeconds": 5},
        "edgepack": {"runtime": "process"},
    }
    assert config.to_json() == document
    # What a device receives is what the hub computes from the same file.
    assert config.settings() == parse_config(DeploymentDocument, document, source="x").to_settings()
    assert config.settings().memory_mb == 256 and config.runtime == "process"
    assert config.with_runtime("docker").runtime == "docker" and config.runtime == "process"
    example = json.loads((EXAMPLE / "deploymentconfig.json").read_text())
    assert DeploymentConfig.from_file(EXAMPLE / "deploymentconfig.json").to_json() == example
    assert LocalWebservice.deploy_configuration(port=8890).to_json() == {"computeType": "local", "port": 8890}
    # edgepack's own keywords, beside Azure's: the file's "edgepack" object, and what devices run.
    own = DeploymentConfig(
        port=8891,
        runtime="process",
        workers=2,
        restart_policy="always",
        environment_variables={"MODE": "edge"},
        health_path="/ready",
        start_timeout_seconds=30,
    )
    assert own.to_json()["edgepack"] == {
        "runtime": "process",
        "workers": 2,
        "restartPolicy": "always",
        "environmentVariables": {"MODE": "edge"},
        "healthPath": "/ready",
        "startTimeoutSeconds": 30,
    }
    ran = own.settings()
    assert (ran.workers, ran.restart_policy, ran.env, ran.health.path, ran.health.start_timeout_s) == (
        2,
        "always",
        {"MODE": "edge"},
        "/ready",
        30,
    )
    aks = AksWebservice.deploy_configuration(cpu_cores=1, memory_gb=1)
    assert isinstance(aks, DeploymentConfig) and aks.to_json()["computeType"] == "aks"
    aci = AciWebservice.deploy_configuration(cpu_cores=1, memory_gb=1, auth_enabled=True).to_json()
    assert aci == {
        "computeType": "aci",
        "containerResourceRequirements": {"cpu": 1, "memoryInGB": 1},
        "authEnabled": True,
    }


def test_an_environment_becomes_the_modules_requirements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = Environment("base")
    env = base.clone("digits-env")
    env.python.conda_dependencies.add_pip_package("onnxruntime")
    env.python.conda_dependencies.add_pip_package("onnxruntime")  # once only
    env.environment_variables["MODE"] = "edge"
    assert base.python.conda_dependencies.pip_packages == []  # a clone is its own
    monkeypatch.chdir(tmp_path)
    config = InferenceConfig(entry_script="score.py", environment=env)
    assert config.base_dir == tmp_path
    assert config.document.pip_requirements() == ["onnxruntime"]
    assert config.document.environment_variables() == {"MODE": "edge"}
    assert config.to_json()["environment"]["python"]["condaDependencies"] == {
        "dependencies": [{"pip": ["onnxruntime"]}]
    }
    from_file = InferenceConfig.from_file(EXAMPLE / "inferenceconfig.json")
    assert from_file.base_dir == EXAMPLE and from_file.document.pip_requirements() == ["onnxruntime", "numpy"]

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy>=1.26  # arrays\n\nonnxruntime\n")
    assert Environment.from_pip_requirements("r", requirements).python.conda_dependencies.pip_packages == [
        "numpy>=1.26",
        "onnxruntime",
    ]
    created = CondaDependencies.create(pip_packages=["numpy"], python_version="3.11")
    assert created.to_json() == {"dependencies": ["python=3.11", {"pip": ["numpy"]}]}
    assert CondaDependencies.from_json(created.to_json()).pip_packages == ["numpy"]


def test_targets_are_normalised() -> None:
    assert str(Selector("tier=gpu, site=berlin")) == "site=berlin,tier=gpu"
    assert Selector(site="berlin").to_json() == {"selector": "site=berlin"}
    assert Devices(["b", "a", "b"]).to_json() == {"devices": ["b", "a"]}
    assert Devices("edge-1").ids == ("edge-1",)


def answer(status: int, body: object) -> httpx.Response:
    request = httpx.Request("GET", "http://hub.invalid/api/v1/x")
    if isinstance(body, str):
        return httpx.Response(status, text=body, request=request)
    return httpx.Response(status, json=body, request=request)


def error(kind: str, message: str = "it went wrong") -> dict[str, dict[str, str]]:
    return {"error": {"type": kind, "message": message}}


@pytest.mark.parametrize(
    ("status", "body", "cls", "exit_code"),
    [
        (422, error("ValidationError"), HubRejected, 2),  # a 422 is not a trust failure by status alone
        (422, error("TrustError"), HubTrustRefusal, 3),
        (404, error("NotFound"), HubNotFound, 2),
        (401, error("Unauthorized"), HubUnauthorized, 2),
        (504, error("GatewayTimeout"), HubFailure, 4),
        (502, error("RegistryUnavailable"), HubFailure, 4),  # a type newer than this SDK: by status
        (502, "<html>Bad Gateway</html>", HubFailure, 4),  # a proxy's page, not the hub's shape
        (404, "not found", HubNotFound, 2),
    ],
)
def test_the_hubs_error_type_names_the_class(
    status: int, body: object, cls: type[HubError], exit_code: int
) -> None:
    exc = hub_error(answer(status, body))
    assert type(exc) is cls and exc.exit_code == exit_code and exc.status == status
    assert exc.kind == (body["error"]["type"] if isinstance(body, dict) else None)
    if cls is HubUnauthorized:
        assert "edgepack login" in str(exc)


def test_the_wait_view_shows_a_download_under_way() -> None:
    from rich.console import Console

    from packager.sdk import ServiceRecord
    from packager.sdk.live import StateLines, devices_table
    from packager.sdk.progress import ProgressEvent

    service = ServiceRecord.of(
        {
            "name": "demo", "module": "demo", "version": "1", "manifest_digest": "sha256:" + "0" * 64,
            "settings": {"port": 8890}, "target": {"devices": ["edge-1"]},
            "created_at": "2026-06-01T00:00:00Z", "updated_at": "2026-06-01T00:00:00Z",
            "state": "Transitioning",
            "devices": [{"device_id": "edge-1", "online": True, "state": "Transitioning",
                         "reason": "downloading version 1",
                         "progress": {"phase": "download", "done_bytes": 3_000_000,
                                      "total_bytes": 9_000_000}}],
        }
    )  # fmt: skip
    console = Console(record=True, width=120)
    console.print(devices_table(service))
    assert "downloading version 1 (3.0/9.0 MB)" in console.export_text()
    out = io.StringIO()
    printer = StateLines(out)
    for _ in range(2):
        printer(ProgressEvent("waiting for demo", 0, 1, "devices", service))
    assert out.getvalue() == "demo on edge-1: Transitioning (downloading version 1)\n"  # once per change


def test_collect_model_data_turns_on_data_collection_as_azures_keyword_does() -> None:
    on = AksWebservice.deploy_configuration(cpu_cores=1, collect_model_data=True, data_spool_quota_mb=512)
    tuned = LocalWebservice.deploy_configuration(port=8890, collect_model_data=True, data_sample_rate=0.25)
    off = AciWebservice.deploy_configuration(cpu_cores=1)

    assert on.to_json()["dataCollection"] == {"storageEnabled": True}
    on_settings, tuned_settings = on.settings().data_collection, tuned.settings().data_collection
    assert on_settings is not None and on_settings.spool_quota_mb == 512
    assert tuned.to_json()["edgepack"] == {"dataCollection": {"sampleRate": 0.25}}
    assert tuned_settings is not None and tuned_settings.sample_rate == 0.25
    assert off.settings().data_collection is None
    with pytest.raises(BadArgument, match="storageEnabled"):
        AksWebservice.deploy_configuration(data_sample_rate=0.5)
