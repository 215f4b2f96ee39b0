"""The docker runtime against a real Docker Engine and a real registry on loopback, with the
runtime image built offline (tests/docker_fixtures.py)."""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
import uuid
from typing import Any

import httpx

from manifests.desired import RuntimeKind
from tests.agent.conftest import Fleet, free_port, score, wait_for
from tests.agent.modules import HANGS_ON_REQUEST, files
from tests.agent.test_updates import FAST_RESTARTS, steady_load
from tests.docker_fixtures import PushedRuntimeImage
from tests.factory import SCORE_PY, ModuleParts

DOCKER = (RuntimeKind.DOCKER,)
# Each run has its own device id: the xdist workers share one Docker Engine, and an agent
# adopts or removes every container labelled with its device.
DEV = f"edge-d{uuid.uuid4().hex[:6]}"


def pinned_module(fleet: Fleet, image: PushedRuntimeImage, version: str, **kw: Any) -> ModuleParts:
    repository = image.pinned.split("@", 1)[0]
    runtime = {"image": f"{repository}:pytest", "image_digest": image.digest}
    return fleet.push("demo", version, runtime=runtime, **kw)


def container_of(engine: Any, device: str) -> Any:
    found = engine.containers.list(filters={"label": f"edgepack.device={device}"})
    assert len(found) == 1, [c.name for c in found]
    return found[0]


def test_a_module_runs_in_a_container_of_its_pinned_image_with_limits_and_labels(
    fleet: Fleet, runtime_image: PushedRuntimeImage, docker_engine: Any
) -> None:
    agent = fleet.device(DEV, runtimes=DOCKER).start()
    port = free_port()
    module = pinned_module(fleet, runtime_image, "1")
    fleet.deploy("demo", module, port=port, devices=[DEV], runtime="docker")
    with fleet.http() as http:  # containerResourceRequirements, as Azure users write them
        r = http.put(
            "/api/v1/deployments/demo",
            json={
                "module": "demo",
                "version": "1",
                "target": {"devices": [DEV]},
                "deployment_config": {
                    "computeType": "local",
                    "port": port,
                    "containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 0.25},
                    "edgepack": {"runtime": "docker"},
                },
            },
        )
        assert r.status_code == 200, r.text
    fleet.wait_rollup("demo", "Healthy", timeout=120)

    def limited() -> Any:
        try:
            c = container_of(docker_engine, DEV)
        except AssertionError:
            return None
        return c if c.attrs["HostConfig"]["NanoCpus"] == 500_000_000 else None

    container = wait_for(limited, timeout=120, what="the container with the limits", log=agent.log)
    agent.wait_state("demo", "Healthy", timeout=120)
    assert score(port, [1, 2]) == {"result": [2, 4]}
    host = container.attrs["HostConfig"]
    assert host["Memory"] == 256 << 20 and host["NetworkMode"] == "host" and host["ReadonlyRootfs"]
    assert container.attrs["Config"]["User"] == "10001:10001"
    assert container.image.id == runtime_image.image_id
    assert container.labels["edgepack.service"] == "demo"
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts["/module"]["RW"] is False and mounts["/run/edgepack"]["RW"] is True


def test_a_docker_update_switches_without_a_failed_request_and_a_restart_adopts(
    fleet: Fleet, runtime_image: PushedRuntimeImage, docker_engine: Any
) -> None:
    agent = fleet.device(DEV, runtimes=DOCKER).start()
    port = free_port()
    module = pinned_module(fleet, runtime_image, "1")
    fleet.deploy("demo", module, port=port, devices=[DEV], runtime="docker")
    agent.wait_state("demo", "Healthy", timeout=120)
    script = SCORE_PY.replace(b"x * factor", b"x * factor * 3 // 2")
    v2 = pinned_module(fleet, runtime_image, "2", files={**files(), "src/score.py": script})
    with steady_load(port) as load:
        time.sleep(0.3)
        fleet.deploy("demo", v2, port=port, devices=[DEV], runtime="docker")
        agent.wait_state("demo", "Healthy", version="2", timeout=120)
        wait_for(lambda: load.answers[3] > 20, what="answers from version 2")
    assert load.failures == [], load.failures[:3]
    assert load.answers[2] > 0
    wait_for(lambda: len(docker_engine.containers.list(filters={"label": f"edgepack.device={DEV}"})) == 1,
             what="the old container to go", timeout=60)  # fmt: skip
    before = container_of(docker_engine, DEV).id
    assert agent.stop() == 0
    agent.start()
    wait_for(lambda: "adopted demo" in agent.log(), what="the adoption", log=agent.log)
    time.sleep(1.0)
    assert container_of(docker_engine, DEV).id == before
    assert agent.wait_state("demo", "Healthy")["restarts"] == 0


def test_an_image_missing_from_the_registry_fails_and_an_unpinned_one_is_refused(
    fleet: Fleet, runtime_image: PushedRuntimeImage
) -> None:
    fleet.device(DEV, runtimes=DOCKER).start()
    repository = runtime_image.pinned.split("@", 1)[0]
    absent = {"image": f"{repository}:pytest", "image_digest": "sha256:" + "0" * 64}
    missing = fleet.push("missing", "1", runtime=absent)
    fleet.deploy("missing", missing, port=free_port(), devices=[DEV], runtime="docker")
    body = fleet.wait_rollup("missing", "Failed", timeout=120)
    assert "is not in its registry" in body["devices"][0]["reason"]
    unpinned = fleet.push("unpinned", "1", runtime={"image": f"{repository}:pytest"})
    fleet.deploy("unpinned", unpinned, port=free_port(), devices=[DEV], runtime="docker")
    body = fleet.wait_rollup("unpinned", "Failed", timeout=60)
    assert "does not pin its runtime image" in body["devices"][0]["reason"]


def test_the_pinned_digest_is_pulled_from_the_registry_whatever_its_tag_now_names(
    fleet: Fleet, runtime_image: PushedRuntimeImage, docker_engine: Any, registry: Any
) -> None:
    agent = fleet.device(DEV, runtimes=DOCKER).start()
    repository = f"{registry.host}/edgepack/moved-{uuid.uuid4().hex[:8]}"
    docker_engine.images.get(runtime_image.image_id).tag(repository, "v1")
    docker_engine.images.push(repository, "v1")
    digest = next(
        d.split("@", 1)[1]
        for d in docker_engine.images.get(f"{repository}:v1").attrs["RepoDigests"]
        if d.startswith(repository + "@")
    )
    # The tag is moved to another image, and the engine forgets the pinned image's names:
    # only the registry still has it, under its digest.
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("not-the-runtime")
        tar.addfile(info, io.BytesIO(b""))
    docker_engine.api.import_image_from_data(data.getvalue(), repository=repository, tag="v1")
    docker_engine.images.push(repository, "v1")
    docker_engine.images.remove(f"{repository}:v1", noprune=True)
    docker_engine.images.remove(f"{repository}@{digest}", noprune=True)
    module = fleet.push("demo", "1", runtime={"image": f"{repository}:v1", "image_digest": digest})
    port = free_port()
    fleet.deploy("demo", module, port=port, devices=[DEV], runtime="docker")
    agent.wait_state("demo", "Healthy", timeout=180)
    assert container_of(docker_engine, DEV).image.id == runtime_image.image_id
    assert f"pulling {repository}@{digest}" in agent.log()
    assert score(port, [3]) == {"result": [6]}


def test_a_service_moves_from_the_process_to_the_docker_runtime(
    fleet: Fleet, runtime_image: PushedRuntimeImage, docker_engine: Any
) -> None:
    agent = fleet.device(DEV, runtimes=(RuntimeKind.PROCESS, RuntimeKind.DOCKER)).start()
    port = free_port()
    module = pinned_module(fleet, runtime_image, "1")
    fleet.deploy("demo", module, port=port, devices=[DEV], runtime="process")
    assert agent.wait_state("demo", "Healthy")["runtime"] == "process"
    fleet.deploy("demo", module, port=port, devices=[DEV], runtime="docker")
    def in_docker() -> dict[str, Any] | None:
        s = agent.service("demo")
        return s if s and s["state"] == "Healthy" and s["container"] else None

    status = wait_for(in_docker, timeout=120, what="the docker instance", log=agent.log)
    assert status["pid"] is None
    assert score(port, [2]) == {"result": [4]}
    assert container_of(docker_engine, DEV).labels["edgepack.service"] == "demo"


def test_a_deployment_that_names_no_runtime_runs_where_each_device_can(
    fleet: Fleet, runtime_image: PushedRuntimeImage, docker_engine: Any
) -> None:
    # Two devices on one machine share its ports, so each gets its own deployment here; on a
    # fleet one deploymentconfig.json without a runtime serves both kinds of device.
    both = fleet.device("edge-both", runtimes=(RuntimeKind.DOCKER, RuntimeKind.PROCESS)).start()
    process_only = fleet.device("edge-proc").start()
    module = pinned_module(fleet, runtime_image, "1")
    fleet.deploy("in-docker", module, port=free_port(), devices=["edge-both"], runtime=None)
    fleet.deploy("as-process", module, port=free_port(), devices=["edge-proc"], runtime=None)
    assert both.wait_state("in-docker", "Healthy", timeout=120)["runtime"] == "docker"
    assert process_only.wait_state("as-process", "Healthy", timeout=120)["runtime"] == "process"
    assert container_of(docker_engine, "edge-both").labels["edgepack.service"] == "in-docker"
    # A module without a pinned image goes to the process runtime, even where docker comes first.
    unpinned = fleet.push("plain", "1")
    fleet.deploy("plain", unpinned, port=free_port(), devices=["edge-both"], runtime=None)
    assert both.wait_state("plain", "Healthy", timeout=60)["runtime"] == "process"


def test_a_container_that_stops_answering_is_gone_before_its_replacement_is_called_healthy(
    fleet: Fleet, runtime_image: PushedRuntimeImage, docker_engine: Any
) -> None:
    agent = fleet.device(DEV, runtimes=DOCKER, **FAST_RESTARTS).start()
    port = free_port()
    probe = {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}
    module = pinned_module(fleet, runtime_image, "1", files=files(HANGS_ON_REQUEST))
    fleet.deploy("demo", module, port=port, devices=[DEV], runtime="docker", probe=probe)
    first = agent.wait_state("demo", "Healthy", timeout=120)["container"]
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(f"http://127.0.0.1:{port}/score", json={"data": ["hang"]}, timeout=0.5)
    agent.wait_state("demo", "Unhealthy", timeout=30)
    def restarted() -> dict[str, Any] | None:
        s = agent.service("demo")
        return s if s and s["restarts"] >= 1 and s["state"] == "Healthy" else None

    healthy = wait_for(restarted, timeout=120, what="the restarted container", log=agent.log)
    # Killed (no drain: its queue is not moving) and removed before Healthy, so the kernel
    # hands the hung container no connection of the port once the service is called Healthy.
    running = docker_engine.containers.list(filters={"label": f"edgepack.device={DEV}"})
    assert healthy["container"] != first
    assert [c.id[:12] for c in running] == [healthy["container"]], [c.name for c in running]
    assert score(port, [4]) == {"result": [8]}
