"""The runtime image, for real: built offline, pushed to a registry on loopback, pulled back by
its digest, and serving a signed module mounted read-only, as a device's docker runtime will
run it. Real engine, real registry, real model; nothing mocked."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pytest

from edge_agent.cache import ModuleCache
from packager.runtime_image.builder import BuildOptions, build_runtime_image
from packager.runtime_image.recipe import LABEL_THIN_KEY, RUNTIME_UID
from packager.runtime_image.source import source_files
from tests.conftest import REPO, Publisher, free_port
from tests.docker_fixtures import RUNTIME_CACHE, RUNTIME_TAG, PushedRuntimeImage, Registry

MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    )
)


@pytest.fixture
def digits_module(tmp_path: Path, digits_bundle: Path, publisher: Publisher) -> Path:
    """The digits module verified and unpacked the way a device does (the module cache)."""
    return ModuleCache(tmp_path / "cache").install_bundle(digits_bundle, publisher.trust).dir


@contextlib.contextmanager
def serving_container(
    engine: Any, image: str, module_dir: Path, labels: dict[str, str], **run: Any
) -> Iterator[tuple[str, Any]]:
    """The image run as the docker runtime runs it: module read-only at /module, root file
    system read-only, host network with the port from EDGEPACK_PORT; yields (url, container)."""
    port = free_port()
    container = engine.containers.run(
        image,
        detach=True,
        network_mode="host",
        environment={"EDGEPACK_PORT": str(port)},
        volumes={str(module_dir): {"bind": "/module", "mode": "ro"}},
        read_only=True,
        tmpfs={"/tmp": "size=16m"},
        mem_limit="512m",
        nano_cpus=1_000_000_000,
        labels=labels,
        **run,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            container.reload()
            if container.status == "exited":
                pytest.fail(f"container exited: {container.logs().decode(errors='replace')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"no /healthz within 60 s: {container.logs().decode(errors='replace')}")
            time.sleep(0.1)
        yield url, container
    finally:
        container.remove(force=True)


def test_the_image_serves_a_signed_module_mounted_read_only(
    docker_engine: Any,
    docker_labels: dict[str, str],
    runtime_image: PushedRuntimeImage,
    digits_module: Path,
    digits_samples: dict[str, list[Any]],
) -> None:
    with serving_container(docker_engine, runtime_image.pinned, digits_module, docker_labels) as (url, box):
        r = httpx.post(f"{url}/score", json={"data": digits_samples["data"]}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == digits_samples["expected"]  # scikit-learn's own answers
        assert httpx.get(f"{url}/swagger.json").json()["info"]["title"] == "digits"
        # Not root, and nothing it may write to but its tmpfs.
        assert box.exec_run("id -u").output.decode().strip() == str(RUNTIME_UID)
        assert box.exec_run("touch /module/x").exit_code != 0
        assert box.exec_run("touch /opt/edgepack/x").exit_code != 0


def test_the_image_holds_what_the_scoring_server_needs_and_not_the_hub(
    docker_engine: Any, runtime_image: PushedRuntimeImage
) -> None:
    script = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "('onnxruntime', 'numpy', 'uvloop', 'httptools', 'inference_schema', 'cryptography', "
        "'fastapi', 'sqlalchemy', 'paho', 'typer', 'pip', 'websockets')}))"
    )
    out = docker_engine.containers.run(
        runtime_image.image_id, entrypoint=["python", "-c", script], remove=True, network_mode="none"
    )
    found = json.loads(out)
    assert {m for m, present in found.items() if present} == {
        "onnxruntime", "numpy", "uvloop", "httptools", "inference_schema", "cryptography",
    }  # fmt: skip


def test_a_pull_by_the_pinned_reference_gets_exactly_the_built_image(
    docker_engine: Any, registry: Registry, runtime_image: PushedRuntimeImage
) -> None:
    pulled = docker_engine.images.pull(runtime_image.pinned)
    assert pulled.id == runtime_image.image_id
    # The registry serves a manifest whose bytes hash to the digest (that is what pinning means).
    manifest = httpx.get(
        f"{registry.url}/v2/edgepack/runtime/manifests/{runtime_image.digest}",
        headers={"Accept": MANIFEST_TYPES},
    )
    assert manifest.status_code == 200
    assert "sha256:" + hashlib.sha256(manifest.content).hexdigest() == runtime_image.digest
    # A digest the registry does not hold pulls nothing.
    unknown = runtime_image.pinned.split("@")[0] + "@sha256:" + "0" * 64
    with pytest.raises(docker.errors.APIError):
        docker_engine.images.pull(unknown)


def test_unchanged_inputs_reuse_both_layers(docker_engine: Any, runtime_image: PushedRuntimeImage) -> None:
    started = time.monotonic()
    again = build_runtime_image(
        BuildOptions(cache_dir=RUNTIME_CACHE, tag=RUNTIME_TAG, source_dir=REPO), client=docker_engine
    )
    assert time.monotonic() - started < 15
    assert (again.base_built, again.thin_built) == (False, False)
    assert again.base_id == runtime_image.build.base_id
    assert again.image_id == runtime_image.image_id


def test_a_code_change_rebuilds_only_the_thin_layer(
    docker_engine: Any, runtime_image: PushedRuntimeImage, tmp_path: Path
) -> None:
    checkout = tmp_path / "edgepack"
    for rel in source_files(REPO):
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, checkout / rel)
    mark = uuid.uuid4().hex
    with (checkout / "edge_agent" / "scoring" / "__init__.py").open("a") as fh:
        fh.write(f"\nCHANGE_MARK = {mark!r}\n")
    changed = build_runtime_image(
        BuildOptions(cache_dir=RUNTIME_CACHE, tag=f"{RUNTIME_TAG}-changed", source_dir=checkout),
        client=docker_engine,
    )
    try:
        assert (changed.base_built, changed.thin_built) == (False, True)
        assert changed.base_id == runtime_image.build.base_id
        assert changed.image_id != runtime_image.image_id
        assert changed.seconds["thin"] < 60
        # The new layer holds the changed code, and only the layers above the base differ.
        out = docker_engine.containers.run(
            changed.image_id,
            entrypoint=["python", "-c", "import edge_agent.scoring as s; print(s.CHANGE_MARK)"],
            remove=True,
            network_mode="none",
        )
        assert out.decode().strip() == mark
        base_layers = docker_engine.images.get(changed.base_id).attrs["RootFS"]["Layers"]
        new_layers = docker_engine.images.get(changed.image_id).attrs["RootFS"]["Layers"]
        assert new_layers[: len(base_layers)] == base_layers
        assert len(new_layers) - len(base_layers) <= 2
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            docker_engine.images.remove(changed.image_id, force=True)
    assert not docker_engine.images.list(filters={"label": f"{LABEL_THIN_KEY}={changed.thin_key}"})


def test_the_command_pushes_and_prints_the_pinned_reference_last(
    runtime_image: PushedRuntimeImage, registry: Registry
) -> None:
    argv = [sys.executable, "-m", "packager", "runtime-image", "build", "--push", registry.host,
            "--tag", RUNTIME_TAG, "--cache-dir", str(RUNTIME_CACHE)]  # fmt: skip
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip().splitlines()[-1] == runtime_image.pinned
    as_json = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["pinned"] == runtime_image.pinned
    assert (doc["base_built"], doc["thin_built"]) == (False, False)
    assert doc["image_id"] == runtime_image.image_id
