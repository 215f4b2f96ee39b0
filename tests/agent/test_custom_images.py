"""Custom base images (an Azure user's ``environment.docker.baseImage``): the docker runtime runs
the agent's own scoring server with any image's ``python3``, and checks the image first.

Real Docker Engine, real registry on loopback, real agent processes; the images are built
offline from a Debian rootfs with no edgepack code in it (tests/foreign_images.py)."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from manifests.desired import RuntimeKind
from packager.runtime_image.engine import push
from tests.agent.conftest import Fleet, free_port, score
from tests.docker_fixtures import Registry
from tests.factory import SCORE_PY
from tests.foreign_images import ForeignImages, foreign_images  # noqa: F401  (the fixture)

#: One worker runs them all: each worker's registry is its own, and pushing the foreign image
#: to one takes about 15 s (its one 308 MB layer shares nothing with the runtime image's).
pytestmark = pytest.mark.xdist_group("foreign-images")

DOCKER = (RuntimeKind.DOCKER,)
DEV = f"edge-c{uuid.uuid4().hex[:6]}"  # the xdist workers share one engine (see test_docker_runtime)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"


def digits_files(digits_model: Path) -> dict[str, bytes]:
    """The stock Azure ML digits module: onnxruntime and numpy, imported by its entry script."""
    return {
        "src/score.py": (EXAMPLE / "score.py").read_bytes(),
        "model/digits.onnx": (digits_model / "digits.onnx").read_bytes(),
    }


def predictions(port: int, samples: dict[str, list[Any]]) -> list[Any]:
    r = httpx.post(f"http://127.0.0.1:{port}/score", json={"data": samples["data"]}, timeout=30)
    assert r.status_code == 200, r.text
    answer: list[Any] = r.json()["predictions"]
    return answer


def test_a_foreign_python_image_serves_and_one_lacking_packages_fails_while_the_last_good_serves(
    fleet: Fleet,
    foreign_images: ForeignImages,  # noqa: F811
    docker_engine: Any,
    digits_model: Path,
    digits_samples: dict[str, list[Any]],
) -> None:
    agent = fleet.device(DEV, runtimes=DOCKER).start()
    port = free_port()
    python = {"python": {"requirements": ["onnxruntime", "numpy"]}}
    v1 = fleet.push("digits", "1", files=digits_files(digits_model),
                    runtime={**foreign_images.python.runtime, **python})  # fmt: skip
    fleet.deploy("digits", v1, port=port, devices=[DEV], runtime="docker")
    agent.wait_state("digits", "Healthy", timeout=180)
    assert predictions(port, digits_samples) == digits_samples["expected"]  # scikit-learn's answers
    (container,) = docker_engine.containers.list(filters={"label": f"edgepack.device={DEV}"})
    assert container.image.id == foreign_images.python.image_id
    # The image's own python3 runs the agent's scoring server, mounted read-only.
    assert container.attrs["Config"]["Entrypoint"][:3] == ["python3", "-m", "edge_agent.scoring"]
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    for package in ("edge_agent", "manifests"):
        assert mounts[f"/opt/edgepack-scoring/{package}"]["RW"] is False

    # Version 2 names an image without onnxruntime and uvicorn: it never starts, and says why.
    v2 = fleet.push("digits", "2", files=digits_files(digits_model),
                    runtime={**foreign_images.lacking.runtime, **python})  # fmt: skip
    fleet.deploy("digits", v2, port=port, devices=[DEV], runtime="docker")
    body = fleet.wait_rollup("digits", "Failed", timeout=180)
    reason = body["devices"][0]["reason"]
    assert (
        f"image {foreign_images.lacking.tagged} lacks python packages: onnxruntime, uvicorn "
        "(pip install them into the image)"
    ) in reason, reason
    status = agent.service("digits")
    assert status is not None and status["serving_version"] == "1", status
    assert predictions(port, digits_samples) == digits_samples["expected"]
    (still,) = docker_engine.containers.list(filters={"label": f"edgepack.device={DEV}"})
    assert still.id == container.id  # the check container is gone, the serving one untouched


def test_an_image_without_python3_fails_naming_what_edgepack_needs(
    fleet: Fleet, docker_engine: Any, registry: Registry
) -> None:
    agent = fleet.device(DEV, runtimes=DOCKER).start()
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("empty"), io.BytesIO(b""))
    repository = f"{registry.host}/acme/no-python-{uuid.uuid4().hex[:8]}"
    docker_engine.api.import_image_from_data(data.getvalue(), repository=repository, tag="1")
    digest = push(docker_engine, f"{repository}:1")
    files = {"src/score.py": SCORE_PY, "model/model.json": b'{"factor": 2}'}
    runtime = {"image": f"{repository}:1", "image_digest": digest}
    module = fleet.push("bare", "1", files=files, runtime=runtime)
    fleet.deploy("bare", module, port=free_port(), devices=[DEV], runtime="docker")
    body = fleet.wait_rollup("bare", "Failed", timeout=120)
    reason = body["devices"][0]["reason"]
    assert f"image {repository}:1 has no python3 on its PATH" in reason, reason
    assert "python3 (>= 3.11)" in reason
    assert not docker_engine.containers.list(all=True, filters={"label": f"edgepack.device={DEV}"})
    assert agent.service("bare") is not None


def test_a_move_to_docker_with_an_image_that_cannot_run_the_module_leaves_the_process_serving(
    fleet: Fleet, foreign_images: ForeignImages, docker_engine: Any  # noqa: F811
) -> None:
    agent = fleet.device(DEV, runtimes=(RuntimeKind.PROCESS, RuntimeKind.DOCKER)).start()
    port = free_port()
    files = {"src/score.py": SCORE_PY, "model/model.json": b'{"factor": 2}'}
    module = fleet.push("demo", "1", files=files, runtime=foreign_images.lacking.runtime)
    fleet.deploy("demo", module, port=port, devices=[DEV], runtime="process")
    assert agent.wait_state("demo", "Healthy")["runtime"] == "process"
    fleet.deploy("demo", module, port=port, devices=[DEV], runtime="docker")
    body = fleet.wait_rollup("demo", "Failed", timeout=120)
    assert "lacks python packages: uvicorn" in body["devices"][0]["reason"], body
    # The image was checked before the process was stopped: the process still answers.
    assert score(port, [3]) == {"result": [6]}
    status = agent.service("demo")
    assert status is not None and status["runtime"] == "process" and status["pid"] is not None, status
    assert not docker_engine.containers.list(all=True, filters={"label": f"edgepack.device={DEV}"})
