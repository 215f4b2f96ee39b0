"""A hub that runs other services, as a user's does, for the examples run in CI."""

from __future__ import annotations

import shutil
from pathlib import Path

from packager.sdk import DeploymentConfig, Devices, InferenceConfig, Model
from tests.agent.conftest import Fleet, free_port
from tests.conftest import EXAMPLE
from tests.sdk.conftest import sdk_hub


def run_another_service(fleet: Fleet, digits_model: Path, work: Path, device: str) -> None:
    """``other-service`` on ``device``, deployed from model ``digits-other``, whose bytes are
    the example's very own (a model delete must not mistake one for the other)."""
    with sdk_hub(fleet.hub) as connected:
        other = Model.register(connected, model_path=digits_model / "digits.onnx", model_name="digits-other")
        (work / "other").mkdir()
        shutil.copy(EXAMPLE / "score.py", work / "other" / "score.py")
        config = InferenceConfig(entry_script=str(work / "other" / "score.py"))
        deployment = DeploymentConfig(port=free_port())
        target = Devices(device)
        running = Model.deploy(connected, "other-service", [other], config, deployment, target=target)
        running.wait_for_deployment(timeout=120)
