"""Azure's deploy of a local model that was never registered (``az ml model deploy --ic … --dc
…`` with the model in ``sourceDirectory``), and a build whose model lies in the source folder:
the folder reaches the device whole, so a script that loads the model from beside itself runs.
Against a real hub, broker and agent."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from packager.sdk import BadArgument, DeploymentConfig, Devices, InferenceConfig, Model, Module
from tests.agent.conftest import Fleet, free_port, score
from tests.conftest import EXAMPLE
from tests.hub.test_registry_cli import run
from tests.sdk.conftest import sdk_hub

#: examples/digits/score.py, but loading the model from its own folder, not AZUREML_MODEL_DIR
BESIDE = 'os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.onnx")'


def local_project(root: Path, digits_model: Path) -> Path:
    src = root / "project"
    src.mkdir(parents=True)
    script = (EXAMPLE / "score.py").read_text()
    old = 'os.path.join(os.getenv("AZUREML_MODEL_DIR"), "digits.onnx")'
    assert old in script
    script = script.replace(old, BESIDE)
    # AZUREML_MODEL_DIR names a folder that exists (empty when no model was registered).
    init = "def init():\n"
    assert init in script
    script = script.replace(init, init + '    assert os.path.isdir(os.getenv("AZUREML_MODEL_DIR"))\n', 1)
    (src / "score.py").write_text(script)
    shutil.copy(EXAMPLE / "inferenceconfig.json", src / "inferenceconfig.json")
    shutil.copy(digits_model / "digits.onnx", src / "digits.onnx")
    return src


def test_a_local_model_deploys_without_registering_and_a_build_keeps_the_source_folder(
    fleet: Fleet, sdk_home: Path, digits_model: Path, digits_samples: dict[str, list[object]], tmp_path: Path
) -> None:
    agent = fleet.device("edge-1").start()
    project = local_project(tmp_path, digits_model)

    def edgepack(*args: str) -> subprocess.CompletedProcess[str]:
        return run(sdk_home, *args, hub=fleet.hub, timeout=180)

    data = digits_samples["data"][:3]
    expected = digits_samples["expected"][:3]

    # 1. edgepack deploy -n NAME --ic --dc: no -m, nothing registered.
    port = free_port()
    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(json.dumps({"computeType": "local", "port": port}))
    ic = str(project / "inferenceconfig.json")
    deployed = edgepack("deploy", "-n", "local-svc", "--ic", ic, "--dc", str(dc), "--target", "device:edge-1")
    assert deployed.returncode == 0, deployed.stderr
    assert "built module local-svc:1 from" in deployed.stdout and "no registered model" in deployed.stdout
    waited = edgepack("service", "wait", "local-svc", "--timeout", "120")
    assert waited.returncode == 0, f"{waited.stdout}{waited.stderr}\n{agent.log()}"
    assert score(port, data)["predictions"] == expected  # type: ignore[arg-type]
    assert edgepack("model", "list", "--json").stdout.strip() == "[]"
    with sdk_hub(fleet.hub) as hub:
        paths = [f.path for f in Module(hub, "local-svc", "1").manifest.files]
        assert "src/digits.onnx" in paths and "src/score.py" in paths
        assert not [p for p in paths if p.startswith("model/")]

        # 2. The SDK: Model.deploy with models=[].
        sdk_port = free_port()
        service = Model.deploy(
            hub,
            "sdk-local",
            [],
            InferenceConfig(entry_script=str(project / "score.py"), source_directory=str(project)),
            DeploymentConfig(port=sdk_port),
            target=Devices(["edge-1"]),
        )
        service.wait_for_deployment(timeout=120)
        assert score(sdk_port, data)["predictions"] == expected  # type: ignore[arg-type]
        # An update of the script: models=[] again (none were registered to rebuild with).
        with (project / "score.py").open("a") as script:
            script.write("\n# v2\n")
        service.update(
            models=[],
            inference_config=InferenceConfig(
                entry_script=str(project / "score.py"), source_directory=str(project)
            ),
        )
        assert service.module_version == "2"
        # The entry script alone looks for the registered models it was built from: none.
        with pytest.raises(BadArgument, match="names no registered model"):
            service.update(
                inference_config=InferenceConfig(
                    entry_script=str(project / "score.py"), source_directory=str(project)
                )
            )
        service.wait_for_deployment(timeout=120)
        assert [d.serving_version for d in service.devices] == ["2"]
        assert score(sdk_port, data)["predictions"] == expected  # type: ignore[arg-type]

    # 3. build -m with the model inside the source folder: it stays in src/ as well as model/.
    built = edgepack(
        "build",
        "--ic",
        ic,
        "-m",
        str(project / "digits.onnx"),
        "-n",
        "beside",
        "-v",
        "1",
        "-o",
        str(tmp_path / "dist"),
    )
    assert built.returncode == 0, built.stderr
    assert edgepack("push", str(tmp_path / "dist" / "beside-1.edgepack")).returncode == 0
    built_port = free_port()
    dc.write_text(
        json.dumps({"computeType": "local", "port": built_port, "edgepack": {"runtime": "process"}})
    )
    assert (
        edgepack(
            "deploy", "-n", "beside", "-m", "beside:1", "--dc", str(dc), "--target", "device:edge-1"
        ).returncode
        == 0
    )
    waited = edgepack("service", "wait", "beside", "--timeout", "120")
    assert waited.returncode == 0, f"{waited.stdout}{waited.stderr}\n{agent.log()}"
    assert score(built_port, data)["predictions"] == expected  # type: ignore[arg-type]

    # Without --ic, -m is still required, and says what else would do.
    neither = edgepack("deploy", "-n", "x", "--target", "device:edge-1")
    assert neither.returncode == 2 and "-m NAME:VERSION" in neither.stderr and "--ic" in neither.stderr
