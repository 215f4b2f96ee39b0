"""A settings-only change (the same module on a new port), then ``edgepack service wait`` in a
new process, as the README's step 8 runs them: the wait may end only once the device serves
the change. The module's digest does not change, so before the hub kept the generation at
which each service last changed on each device, the device's report from before the change
(Healthy, same digest) was taken as the answer and the wait ended at once, on the old port.
Against a real hub, broker and agent."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from packager.sdk import DeploymentConfig, Devices, InferenceConfig, Model
from tests.agent.conftest import Fleet, free_port, score
from tests.conftest import EXAMPLE
from tests.hub.test_registry_cli import run
from tests.sdk.conftest import sdk_hub


def test_service_wait_after_a_settings_only_change_ends_when_the_device_serves_it(
    fleet: Fleet, sdk_home: Path, digits_model: Path, digits_samples: dict[str, list[object]], tmp_path: Path
) -> None:
    agent = fleet.device("edge-1").start()
    (tmp_path / "src").mkdir()
    shutil.copy(EXAMPLE / "score.py", tmp_path / "src" / "score.py")
    first, second = free_port(), free_port()
    with sdk_hub(fleet.hub) as hub:
        model = Model.register(hub, model_path=digits_model / "digits.onnx", model_name="digits")
        config = InferenceConfig(entry_script=str(tmp_path / "src" / "score.py"))
        service = Model.deploy(
            hub, "svc", [model], config, DeploymentConfig(port=first), target=Devices("edge-1")
        )
        service.wait_for_deployment(timeout=120)
    def edgepack(*args: str) -> subprocess.CompletedProcess[str]:
        return run(sdk_home, *args, hub=fleet.hub, timeout=180)

    # The device is offline when the change is made: its last report (Healthy, the same
    # digest) is from before it, whatever the timing.
    agent.stop()
    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(json.dumps({"computeType": "local", "port": second}))
    deployed = edgepack("deploy", "-n", "svc", "-m", "svc:1", "--dc", str(dc), "--target", "device:edge-1")
    assert deployed.returncode == 0, deployed.stderr
    with fleet.http() as http:
        device = http.get("/api/v1/deployments/svc").json()["devices"][0]
    assert (device["state"], device["reason"]) == ("Transitioning", "has not applied the latest change yet")
    waited = edgepack("service", "wait", "svc", "--timeout", "120")
    assert waited.returncode == 5 and "edge-1 is offline" in waited.stderr, waited.stdout + waited.stderr

    agent.start()
    waited = edgepack("service", "wait", "svc", "--timeout", "120")
    assert waited.returncode == 0, f"{waited.stdout}{waited.stderr}\n{agent.log()}"
    data = digits_samples["data"][:2]
    assert score(second, data)["predictions"] == digits_samples["expected"][:2]  # type: ignore[arg-type]
