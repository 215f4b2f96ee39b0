"""``examples/azure_cli_walkthrough.sh``, every ``az ml`` step of the seed document with the
edgepack CLI, run as a user runs it: its own bash process, from a copy of ``examples/digits``,
against a real hub (with its Mosquitto) that already runs another service, and a real agent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.agent.conftest import Fleet, free_port
from tests.conftest import EXAMPLE, REPO
from tests.hub.test_registry_cli import cli_env
from tests.sdk.other_services import run_another_service

WALKTHROUGH = REPO / "examples" / "azure_cli_walkthrough.sh"


def test_every_az_ml_step_of_the_seed_has_its_edgepack_step() -> None:
    # The seed's CLI steps, as the walkthrough quotes them; `az ml service <name>` is the seed's
    # typo for `az ml service delete`.
    script = WALKTHROUGH.read_text()
    for azure in (
        "az ml workspace list",
        "az ml model register -n onnx_mnist -p mnist/model.onnx",
        "az ml model deploy -m mymodel:1 --ic inferenceconfig.json --dc deploymentconfig.json",
        "az ml model deploy --ic inferenceconfig.json --dc deploymentconfig.json",
        "az ml service delete",
        "az ml model delete",
    ):
        assert f"# Azure: {azure}" in script, azure


def test_the_walkthrough_runs_every_step_on_a_device(
    fleet: Fleet, sdk_home: Path, digits_model: Path, digits_samples: dict[str, list[object]], tmp_path: Path
) -> None:
    device = fleet.device("edge-1", tags={"site": "berlin"}).start()
    work = tmp_path / "digits"
    (work / "model").mkdir(parents=True)
    for name in ("score.py", "inferenceconfig.json"):
        shutil.copy(EXAMPLE / name, work / name)
    for name in ("digits.onnx", "test_samples.json"):
        shutil.copy(digits_model / name, work / "model" / name)
    run_another_service(fleet, digits_model, tmp_path, "edge-1")
    env = cli_env(sdk_home, fleet.hub)
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            "PORT": str(free_port()),
            "LOCAL_PORT": str(free_port()),
        }
    )

    run = subprocess.run(
        ["bash", str(WALKTHROUGH)], cwd=work, env=env, capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n--- agent ---\n{device.log()}"

    out = run.stdout
    # Both services answered with the predictions scikit-learn made, through the device.
    answers = [json.loads(f"[{found}]") for found in re.findall(r'"predictions": \[([^\]]*)\]', out)]
    assert answers == [digits_samples["expected"][:5]] * 2, out
    assert re.search(r"model loaded from .*digits\.onnx", out), out  # the module's log (init())
    assert "built module mylocalservice:1 from" in out and "no registered model" in out
    # Everything the walkthrough made is gone; the other service and its model are untouched.
    with fleet.http() as http:
        assert [d["name"] for d in http.get("/api/v1/deployments").json()["deployments"]] == ["other-service"]
        assert [m["name"] for m in http.get("/api/v1/models").json()] == ["digits-other"]
        assert http.get("/api/v1/deployments/other-service").json()["name"] == "other-service"
