"""Azure's one-command deploy through the CLI: ``edgepack deploy -n S -m MODEL:1 --ic … --dc …``
builds a module from a registered model and the entry script's folder, signs it, sends only
what the hub lacks and deploys it; run as a user runs it, against a real fleet."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.agent.conftest import Fleet, free_port, score
from tests.hub.test_registry_cli import run


def test_one_command_deploys_a_registered_model_with_its_entry_script(
    fleet: Fleet, sdk_home: Path, digits_source: Path, digits_samples: dict[str, list[object]], tmp_path: Path
) -> None:
    agent = fleet.device("edge-1", tags={"site": "berlin"}).start()

    def edgepack(*args: str) -> subprocess.CompletedProcess[str]:
        return run(sdk_home, *args, hub=fleet.hub, timeout=180)

    registered = edgepack("model", "register", "-n", "digits", "-p", str(digits_source / "digits.onnx"))
    assert registered.returncode == 0, registered.stderr
    port = free_port()
    dc = tmp_path / "deploymentconfig.json"
    config = json.loads((digits_source / "deploymentconfig.json").read_text())
    dc.write_text(json.dumps({**config, "port": port}))
    ic = str(digits_source / "inferenceconfig.json")
    args = (
        "deploy",
        "-n",
        "digits-svc",
        "-m",
        "digits:1",
        "--ic",
        ic,
        "--dc",
        str(dc),
        "--selector",
        "site=berlin",
    )

    deployed = edgepack(*args)
    assert deployed.returncode == 0, deployed.stderr
    assert "built module digits-svc:1 from digits:1" in deployed.stdout
    assert "service digits-svc created: digits-svc:1" in deployed.stdout
    waited = edgepack("service", "wait", "digits-svc", "--timeout", "120")
    assert waited.returncode == 0, f"{waited.stdout}{waited.stderr}\n{agent.log()}"
    data = digits_samples["data"][:5]
    assert score(port, data)["predictions"] == digits_samples["expected"][:5]  # type: ignore[arg-type]

    # The module holds the registered model under model/ and the entry script's folder under
    # src/ (the folder's copy of the model too: the hub held its bytes, so none were sent).
    with fleet.http() as http:
        module = http.get("/api/v1/modules/digits-svc/versions/1").json()
    paths = [f["path"] for f in module["files"]]
    assert "model/digits.onnx" in paths and "src/score.py" in paths and "src/digits.onnx" in paths

    again = edgepack(*args, "--json")
    assert again.returncode == 0, again.stderr
    body = json.loads(again.stdout)
    assert body["module_version"] == "1" and body["created"] is False  # nothing changed, nothing built

    # Without --ic, -m names a pushed module, as before.
    pushed = edgepack("deploy", "-n", "other", "-m", "digits:1", "--selector", "site=berlin")
    assert pushed.returncode == 2 and "module 'digits' is not in the registry" in pushed.stderr
