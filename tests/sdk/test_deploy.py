"""``Model.deploy`` and ``Service`` on a real fleet: a hub with its Mosquitto and a real agent
process; every request the SDK sends is recorded from its own HTTP client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from manifests.digests import sha256_digest
from manifests.states import ServiceState, StateOnDevice
from packager.sdk import (
    BadArgument,
    DeploymentConfig,
    DeploymentFailed,
    DeploymentTimeout,
    Devices,
    Environment,
    Hub,
    HubConflict,
    HubNotFound,
    InferenceConfig,
    Model,
    Module,
    ScoringRunFailed,
    Selector,
    Service,
    ServiceExists,
)
from tests.agent.conftest import Fleet, free_port
from tests.conftest import EXAMPLE
from tests.factory import Forge
from tests.sdk.conftest import sdk_hub
from tests.sdk.test_local_service import BROKEN_INIT
from tests.waiting import wait_for


class Requests(list[tuple[str, str]]):
    """Every (method, path) a Hub's client sends, as it sends it."""

    def watch(self, hub: Hub) -> Hub:
        hub.transport.http.event_hooks["request"].append(lambda r: self.append((r.method, r.url.path)))
        return hub

    def puts(self) -> list[str]:
        return [path for method, path in self if method == "PUT" and path.startswith("/api/v1/blobs/")]


def source_folder(root: Path, comment: str = "") -> Path:
    folder = root / "src"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "score.py").write_text((EXAMPLE / "score.py").read_text() + comment)
    return folder


def edgepack_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``edgepack`` command, logged in to the fleet's hub through the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
    env.update({"EDGEPACK_HUB_URL": fleet.hub.url, "EDGEPACK_TOKEN": fleet.hub.admin_token, "COLUMNS": "200"})
    return subprocess.run(
        [sys.executable, "-m", "packager", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def inference_config(hub: Hub, folder: Path) -> InferenceConfig:
    env = Environment.get(hub, "AzureML-Minimal").clone("digits-env")
    for package in ("onnxruntime", "numpy"):
        env.python.conda_dependencies.add_pip_package(package)
    return InferenceConfig(
        entry_script=str(folder / "score.py"), source_directory=str(folder), environment=env
    )


def test_deploy_sends_only_what_the_hub_lacks_and_serves_on_the_device(
    fleet: Fleet, sdk_home: Path, digits_model: Path, digits_samples: dict[str, list[object]], tmp_path: Path
) -> None:
    agent = fleet.device("edge-1", tags={"site": "berlin"}).start()
    sent = Requests()
    hub = sent.watch(sdk_hub(fleet.hub))
    model = Model.register(hub, model_path=digits_model / "digits.onnx", model_name="digits")
    folder = source_folder(tmp_path)
    shutil.copy(digits_model / "digits.onnx", folder / "copy.onnx")  # the model's bytes, again
    port = free_port()
    sent.clear()

    service = Model.deploy(
        hub,
        "digits-svc",
        [model],
        inference_config(hub, folder),
        DeploymentConfig(port=port),
        target=Selector(site="berlin"),
    )
    # Only score.py crossed the wire: the model (and its copy in the source folder) the hub held.
    assert sent.puts() == [f"/api/v1/blobs/{sha256_digest((folder / 'score.py').read_bytes())}"]
    # The models' bytes are not downloaded: the manifest names the registry's digests.
    assert not [path for method, path in sent if method == "GET" and path.startswith("/api/v1/blobs/")]
    assert ("POST", "/api/v1/modules") in sent and ("PUT", "/api/v1/deployments/digits-svc") in sent
    assert service.module_version == "1" and service.module == "digits-svc:1"
    assert service.settings.runtime == "process"  # no pinned image: Docker could not run it
    service.wait_for_deployment(timeout=120)
    assert service.state == ServiceState.HEALTHY
    [device] = service.devices
    assert (device.device_id, device.endpoint, device.serving_version) == (
        "edge-1",
        f"http://127.0.0.1:{port}",
        "1",
    )
    data = digits_samples["data"][:5]
    assert service.run({"data": data})["predictions"] == digits_samples["expected"][:5]
    assert (
        service.run(f'{{"data": {data}}}', device="edge-1")["predictions"] == digits_samples["expected"][:5]
    )
    assert "model loaded from" in service.get_logs(device="edge-1", tail=50)
    assert "model loaded from" in service.get_logs(num_lines=50)  # Azure's keyword, the first Healthy device
    # Where to call it: the first Healthy device's endpoint, and its OpenAPI document beside it.
    assert service.scoring_uri == f"http://127.0.0.1:{port}/score"
    assert service.swagger_uri == f"http://127.0.0.1:{port}/swagger.json"
    assert httpx.get(service.swagger_uri, timeout=10).json()["paths"]
    assert service.logs().device_id == "edge-1"

    # The same inputs again: the same module version, nothing uploaded, nothing registered.
    sent.clear()
    config = inference_config(hub, folder)
    again = Model.deploy(
        hub,
        "digits-svc",
        [model],
        config,
        DeploymentConfig(port=port),
        target=Selector("site=berlin"),
        overwrite=True,
    )
    assert again.module_version == "1" and sent.puts() == [] and ("POST", "/api/v1/modules") not in sent
    with pytest.raises(ServiceExists, match="overwrite=True"):
        Model.deploy(hub, "digits-svc", [model], inference_config(hub, folder), target=Devices(["edge-1"]))

    # A changed entry script: version 2, one file sent, served without a failed request.
    sent.clear()
    changed = source_folder(tmp_path, comment="\n# version 2\n")
    service.update(models=[model], inference_config=inference_config(hub, changed))
    assert service.module_version == "2" and len(sent.puts()) == 1
    assert service.settings.port == port  # the settings stayed
    service.wait_for_deployment(timeout=120)
    assert [d.serving_version for d in service.devices] == ["2"]
    agent.wait_state("digits-svc", "Healthy", version="2")

    service.update(target=Devices(["edge-1"]))
    assert service.record.target == {"devices": ["edge-1"]} and service.module == "digits-svc:2"
    assert [s.name for s in Service.list(hub)] == ["digits-svc"]
    change = service.delete()
    assert list(change.issued) == ["edge-1"]
    # Its devices stop running it: the agent drops it and its port answers no more.
    wait_for(lambda: agent.service("digits-svc") is None or None, what="digits-svc stopped", log=agent.log)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    with pytest.raises(HubNotFound):
        Service(hub, "digits-svc")


def test_hub_deploy_of_a_pushed_module_and_a_wait_that_times_out(
    fleet: Fleet, sdk_home: Path, digits_bundle: Path
) -> None:
    from packager.sdk import DeploymentTimeout, Device, Module

    hub = sdk_hub(fleet.hub, target=Selector("site=munich"))
    credentials = Device.enroll(hub, "edge-9", tags={"site": "munich"})  # no agent will run
    assert credentials.device_id == "edge-9" and credentials.publishers.keys
    Module.push(hub, digits_bundle)
    service = hub.deploy("digits", "digits:1", DeploymentConfig(port=free_port(), runtime="process"))
    assert service.deployed is not None and service.deployed.created
    with pytest.raises(DeploymentTimeout) as timeout:
        service.wait_for_deployment(timeout=1, interval=0.2)
    assert "edge-9" in str(timeout.value) and timeout.value.exit_code == 5
    assert [(d.device_id, d.state) for d in timeout.value.devices] == [("edge-9", "Pending")]
    # A pushed module names no registered model it was built from: a rebuild needs them given.
    with pytest.raises(BadArgument, match="names no registered model"):
        service.update(inference_config=InferenceConfig(entry_script=str(EXAMPLE / "score.py")))


def test_what_a_device_enrolment_answers_and_tags_change(hub_sdk: Hub, tmp_path: Path) -> None:
    from packager.sdk import Device, save_credentials

    creds = Device.enroll(hub_sdk, "edge-1", tags={"site": "berlin"})
    path = save_credentials(creds, tmp_path / "edge-1.json")
    assert path.stat().st_mode & 0o777 == 0o600
    Device.enroll(hub_sdk, "edge-2", tags={"site": "munich"})
    assert [d.id for d in Device.list(hub_sdk, selector="site=berlin")] == ["edge-1"]
    device = Device(hub_sdk, "edge-2")
    change = device.tag({"site": "berlin", "tier": "gpu"})
    assert device.tags == {"site": "berlin", "tier": "gpu"} and change.issued == {}
    assert [d.id for d in Device.list(hub_sdk, selector=Selector(site="berlin"))] == ["edge-1", "edge-2"]
    device.tag(remove=["tier"])
    assert device.tags == {"site": "berlin"}
    device.revoke()
    assert [d.id for d in Device.list(hub_sdk)] == ["edge-1"]
    assert [d.id for d in Device.list(hub_sdk, include_revoked=True)] == ["edge-1", "edge-2"]
    assert isinstance(Device(hub_sdk, "edge-1").modules, list)


def test_several_models_lie_where_azure_puts_them(hub_sdk: Hub, tmp_path: Path) -> None:
    from packager.sdk.deploy import model_entries

    a, b = tmp_path / "a.onnx", tmp_path / "labels"
    a.write_bytes(b"a")
    b.mkdir()
    (b / "names.txt").write_bytes(b"cat")
    one = Model.register(hub_sdk, model_path=a, model_name="first")
    two = Model.register(hub_sdk, model_path=b, model_name="second")
    assert [e.path for e in model_entries([one])] == ["model/a.onnx"]
    assert [e.path for e in model_entries([one, two])] == [
        "model/first/1/a.onnx",
        "model/second/1/labels/names.txt",
    ]


def test_a_wait_after_an_update_waits_for_that_update(
    fleet: Fleet,
    sdk_home: Path,
    digits_model: Path,
    digits_samples: dict[str, list[object]],
    tmp_path: Path,
    forge: Forge,
) -> None:
    """A settings-only update keeps the module's digest: only the generation it issued tells
    the device's new state from the old one. And an entry script alone rebuilds with the
    models the service was built from."""
    agent = fleet.device("edge-1").start()
    hub = sdk_hub(fleet.hub)
    model = Model.register(hub, model_path=digits_model / "digits.onnx", model_name="digits")
    first_port, second_port = free_port(), free_port()
    service = Model.deploy(
        hub,
        "digits-svc",
        [model],
        inference_config(hub, source_folder(tmp_path)),
        DeploymentConfig(port=first_port),
        target=Devices(["edge-1"]),
    )
    service.wait_for_deployment(timeout=120)
    data = {"data": digits_samples["data"][:2]}

    service.update(deployment_config=DeploymentConfig(port=second_port, runtime="process"))
    service.wait_for_deployment(timeout=120)  # returns once edge-1 reports the new generation
    assert service.state == ServiceState.HEALTHY
    assert [d.endpoint for d in service.devices] == [f"http://127.0.0.1:{second_port}"]
    assert service.run(data)["predictions"] == digits_samples["expected"][:2]

    # The same from the command line, through the hub's view of where the service answers.
    called = edgepack_cli(fleet, "service", "run", "digits-svc", "--data", json.dumps(data))
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["predictions"] == digits_samples["expected"][:2]
    raised = edgepack_cli(fleet, "service", "run", "digits-svc", "--data", '{"data": [[1, 2]]}')
    assert raised.returncode == 5 and "run() raised" in raised.stderr, raised.stderr
    with pytest.raises(ScoringRunFailed, match=r"run\(\) raised") as run_failed:
        service.run({"data": [[1, 2]]})
    assert run_failed.value.exit_code == 5

    with pytest.raises(BadArgument, match="inference_config"):
        service.update(models=[model])  # the entry script to build them with is not on the hub

    # What is not given stays: the models (from the module's signed tags) and the settings.
    service.update(inference_config=inference_config(hub, source_folder(tmp_path / "v2", "\n# v2\n")))
    assert service.module_version == "2" and service.settings.port == second_port
    service.wait_for_deployment(timeout=120)
    assert [(d.serving_version, d.endpoint) for d in service.devices] == [
        ("2", f"http://127.0.0.1:{second_port}")
    ]
    agent.wait_state("digits-svc", "Healthy", version="2")
    built = Module(hub, "digits-svc", "2").manifest
    assert [f.digest for f in built.files if f.path == "model/digits.onnx"] == [model.files[0].digest]
    with pytest.raises(HubConflict, match="'digits-svc'"):
        model.delete()  # the rebuilt module still names the model it was built from

    # A module whose init() raises: the device ends Failed, the wait says so with every
    # device's state, and the failed instance's log stays on the device.
    broken = tmp_path / "broken-1.edgepack"
    broken.write_bytes(
        forge.bundle(name="broken", files={"src/score.py": BROKEN_INIT, "model/m.json": b"{}"})
    )
    Module.push(hub, broken)
    failing = hub.deploy(
        "broken", "broken:1", DeploymentConfig(port=free_port(), runtime="process"), Devices("edge-1")
    )
    with pytest.raises(DeploymentFailed, match="no weights here") as failed:
        failing.wait_for_deployment(timeout=120)
    assert failed.value.exit_code == 5 and not isinstance(failed.value, DeploymentTimeout)
    assert [(d.device_id, d.state) for d in failed.value.devices] == [("edge-1", StateOnDevice.FAILED)]
    assert failing.state == ServiceState.FAILED
    with pytest.raises(HubNotFound, match="version 1 failed there and left a log"):
        failing.logs("edge-1")  # nothing serves: no instance's log but the failed one's
    kept = failing.logs("edge-1", failed=True)
    assert (kept.device_id, kept.failed, kept.version, kept.failed_version) == ("edge-1", True, "1", "1")
    assert any("no weights here" in line for line in kept.lines)
