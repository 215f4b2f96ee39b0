"""``edgepack build --runtime-image``: the signed manifest pins the runtime image by digest
when the image can be resolved, and says so loudly when it cannot."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from typer.testing import CliRunner

from packager.cli import app
from packager.inspect import read_unverified
from packager.runtime_image.pinning import pin_image
from tests.conftest import EXAMPLE, REPO
from tests.docker_fixtures import PushedRuntimeImage, Registry
from tests.engines import nowhere_image


@pytest.fixture
def project(tmp_path: Path, digits_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The digits example with its model, and a private EDGEPACK_HOME with a signing key."""
    monkeypatch.setenv("EDGEPACK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    assert CliRunner().invoke(app, ["keygen"]).exit_code == 0
    path = tmp_path / "digits"
    path.mkdir()
    for name in ("score.py", "inferenceconfig.json", "deploymentconfig.json"):
        shutil.copy(EXAMPLE / name, path / name)
    shutil.copytree(digits_model, path / "model")
    return path


def build(project: Path, *extra: str, out: str = "dist") -> tuple[Any, Path]:
    result = CliRunner().invoke(
        app,
        ["build", "--ic", str(project / "inferenceconfig.json"), "-m", str(project / "model"),
         "-n", "digits", "-v", "1", "-o", str(project / out), *extra],
    )  # fmt: skip
    return result, project / out / "digits-1.edgepack"


def test_a_reachable_tag_is_pinned_to_its_digest(project: Path, runtime_image: PushedRuntimeImage) -> None:
    result, bundle = build(project, "--runtime-image", runtime_image.tagged)
    assert result.exit_code == 0, result.output
    runtime = read_unverified(bundle)[2].runtime
    assert (runtime.image, runtime.image_digest) == (runtime_image.tagged, runtime_image.digest)
    assert "warning" not in result.output
    # The same inputs still give the same bytes.
    again, second = build(project, "--runtime-image", runtime_image.tagged, out="dist2")
    assert again.exit_code == 0, again.output
    assert second.read_bytes() == bundle.read_bytes()


def test_a_digest_reference_is_recorded_as_given(project: Path) -> None:
    digest = "sha256:" + "ab" * 32
    result, bundle = build(project, "--runtime-image", f"registry.example:5000/team/runtime:v2@{digest}")
    assert result.exit_code == 0, result.output
    runtime = read_unverified(bundle)[2].runtime
    assert (runtime.image, runtime.image_digest) == ("registry.example:5000/team/runtime:v2", digest)


def test_an_unreachable_image_is_kept_unpinned_with_a_one_line_warning(project: Path) -> None:
    nowhere = nowhere_image()
    result, bundle = build(project, "--runtime-image", nowhere)
    assert result.exit_code == 0, result.output
    runtime = read_unverified(bundle)[2].runtime
    assert (runtime.image, runtime.image_digest) == (nowhere, None)
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1
    assert "docker runtime refuses an unpinned image" in warning[0]


def test_a_bad_reference_is_a_config_error(project: Path) -> None:
    result, bundle = build(project, "--runtime-image", "Edgepack/Runtime:py311")
    assert result.exit_code != 0
    assert not bundle.exists()


def test_a_tag_known_only_to_the_registry_is_resolved_there(
    docker_engine: Any, registry: Registry, runtime_image: PushedRuntimeImage
) -> None:
    # Pushed under another tag, then that tag removed here: only the registry still knows it.
    remote = f"{registry.host}/edgepack/runtime:only-remote"
    docker_engine.images.get(runtime_image.image_id).tag(remote)
    for _event in docker_engine.api.push(remote, stream=True, decode=True):
        pass
    docker_engine.images.remove(remote, noprune=True)
    try:
        pin = pin_image(remote, client=docker_engine)
        assert (pin.image, pin.digest, pin.source) == (remote, runtime_image.digest, "registry")
        assert pin.warning() is None
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            docker_engine.images.remove(remote, noprune=True)


def test_a_tag_missing_everywhere_is_unpinned(docker_engine: Any, registry: Registry) -> None:
    pin = pin_image(f"{registry.host}/edgepack/runtime:never-pushed", client=docker_engine)
    assert pin.digest is None and pin.source == "none"
    assert pin.warning() is not None and "never-pushed" in pin.warning()


def with_base_image(project: Path, image: str) -> None:
    """The inference configuration names ``image`` as Azure ML does: environment.docker.baseImage."""
    path = project / "inferenceconfig.json"
    config = json.loads(path.read_text())
    config["environment"]["docker"] = {"enabled": True, "baseImage": image}
    path.write_text(json.dumps(config))


def test_an_environment_base_image_is_the_runtime_image_pinned_to_its_digest(
    project: Path, runtime_image: PushedRuntimeImage
) -> None:
    with_base_image(project, runtime_image.tagged)
    result, bundle = build(project)
    assert result.exit_code == 0, result.output
    runtime = read_unverified(bundle)[2].runtime
    assert (runtime.image, runtime.image_digest) == (runtime_image.tagged, runtime_image.digest)
    assert f"runtime image {runtime_image.tagged}@{runtime_image.digest}" in result.output


def test_a_base_image_that_cannot_be_pinned_is_refused_and_runtime_image_overrides_it(project: Path) -> None:
    nowhere = nowhere_image()
    with_base_image(project, nowhere)
    # A real `python -m packager`: the one-line error and the exit code are what a shell sees.
    done = subprocess.run(
        [sys.executable, "-m", "packager", "build", "--ic", str(project / "inferenceconfig.json"),
         "-m", str(project / "model"), "-n", "digits", "-v", "1", "-o", str(project / "dist")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"the inference configuration's baseImage {nowhere} cannot be pinned to a digest" in lines[0]
    assert "--runtime-image" in lines[0]
    assert not (project / "dist" / "digits-1.edgepack").exists()
    digest = "sha256:" + "cd" * 32
    result, bundle = build(project, "--runtime-image", f"registry.example:5000/team/py:1@{digest}")
    assert result.exit_code == 0, result.output
    assert read_unverified(bundle)[2].runtime.image_digest == digest
