"""``examples/sdk_quickstart.py``, the Azure ML workflow in Python, run as a user runs it:
a real hub with its Mosquitto, a real agent process serving the module, the example as its
own Python process reading the login from the environment."""

from __future__ import annotations

import ast
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.agent.conftest import Fleet
from tests.conftest import EXAMPLE, REPO
from tests.hub.test_registry_cli import cli_env
from tests.sdk.other_services import run_another_service

EXAMPLE_PORT = 8890  # what the example deploys to, as the seed's LocalWebservice does


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_example_runs_the_azure_workflow_on_a_device(
    fleet: Fleet, sdk_home: Path, digits_model: Path, digits_samples: dict[str, list[object]], tmp_path: Path
) -> None:
    assert port_is_free(EXAMPLE_PORT), f"port {EXAMPLE_PORT}, which the example deploys to, is in use"
    device = fleet.device("edge-1", tags={"site": "berlin"}).start()
    work = tmp_path / "digits"
    (work / "model").mkdir(parents=True)
    shutil.copy(EXAMPLE / "score.py", work / "score.py")
    for name in ("digits.onnx", "test_samples.json"):
        shutil.copy(digits_model / name, work / "model" / name)
    run_another_service(fleet, digits_model, tmp_path, "edge-1")
    env = cli_env(sdk_home, fleet.hub)

    run = subprocess.run(
        [sys.executable, str(REPO / "examples" / "sdk_quickstart.py")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n--- agent ---\n{device.log()}"

    lines = run.stdout.splitlines()
    assert lines[0].split("\t") == ["digits", "digits:1", "1"]
    assert "myservice on edge-1: Healthy" in lines  # show_output, outside a terminal
    assert "Healthy" in lines
    answer = ast.literal_eval(next(line for line in lines if line.startswith("{")))  # print(dict)
    assert answer["predictions"] == digits_samples["expected"][:5]
    assert any("model loaded from" in line for line in lines), run.stdout  # get_logs: score.py's init()

    # service.delete() and model.delete(): nothing of either is left on the hub, and the other
    # service, whose model holds the same bytes, is untouched.
    with fleet.http() as http:
        assert [d["name"] for d in http.get("/api/v1/deployments").json()["deployments"]] == ["other-service"]
        assert [m["name"] for m in http.get("/api/v1/models").json()] == ["digits-other"]
        modules = {m["name"]: m for m in http.get("/api/v1/modules").json()}
    module = modules["myservice"]
    assert (module["name"], module["version"]) == ("myservice", "1")
    assert [f["path"] for f in module["files"]] == ["model/digits.onnx", "src/score.py"]
