"""A deployment with ``dataCollection`` on a real agent and a real hub, with either runtime: the
agent hands the module its spool, an unchanged Azure script's records land in it, and a hub
that has no upload route yet (404: devices are upgraded first) costs no record."""

from __future__ import annotations

import gzip
import uuid
from typing import Any

import httpx

from edge_agent.data.spool import list_spool, spool_dir
from manifests.data import CollectedRecord
from manifests.desired import RuntimeKind
from tests.agent.conftest import Agent, Fleet, free_port
from tests.agent.hub_proxy import hub_proxy
from tests.docker_fixtures import PushedRuntimeImage
from tests.waiting import wait_for

AZURE_SCORE_PY = b"""
import json
from azureml.monitoring import ModelDataCollector

def init():
    global inputs_dc
    inputs_dc = ModelDataCollector("digits", designation="inputs")

def run(raw_data):
    data = json.loads(raw_data)["data"]
    inputs_dc.collect(data)
    return [sum(row) for row in data]
"""


def deploy_collecting(fleet: Fleet, agent: Agent, kind: str, **module: Any) -> int:
    parts = fleet.push(
        "collects", "1", files={"src/score.py": AZURE_SCORE_PY, "model/model.json": b"{}"}, **module
    )
    port = free_port()
    config = {
        "computeType": "local",
        "port": port,
        "dataCollection": {"storageEnabled": True},
        "edgepack": {"runtime": kind},
    }
    with fleet.http() as http:
        r = http.put(
            "/api/v1/deployments/collects",
            json={"module": parts.manifest.name, "version": "1", "deployment_config": config,
                  "target": {"devices": [agent.device_id]}},
        )  # fmt: skip
    assert r.status_code in (200, 201), r.text
    return port


def score_and_read_spool(agent: Agent, port: int) -> list[CollectedRecord]:
    for i in range(5):
        answer = httpx.post(
            f"http://127.0.0.1:{port}/score", json={"data": [[i, 1]]}, headers={"x-ms-request-id": f"req-{i}"}
        )
        assert answer.status_code == 200 and answer.headers["x-ms-request-id"] == f"req-{i}"
    folder = spool_dir(agent.state_dir, "collects")
    # The segment closes after its age (10 s); the hub answers the upload 404, so it stays.
    wait_for(lambda: list_spool(folder).segments, timeout=60, what="a segment", log=agent.log)
    wait_for(lambda: "data upload waits" in agent.log(), timeout=30, what="an upload tried", log=agent.log)
    return [
        CollectedRecord.model_validate_json(line)
        for s in list_spool(folder).segments
        for line in gzip.decompress(s.path.read_bytes()).splitlines()
    ]


def assert_collected(records: list[CollectedRecord]) -> None:
    assert [r.correlation_id for r in records] == [f"req-{i}" for i in range(5)]
    assert {(r.service, r.model, r.model_version, r.designation) for r in records} == {
        ("collects", "digits", "1", "inputs")
    }
    assert [r.data for r in records] == [[[i, 1]] for i in range(5)]


def test_the_process_runtime_gives_a_collecting_service_its_spool_and_keeps_what_the_hub_cannot_take(
    fleet: Fleet,
) -> None:
    agent = fleet.device("dc-1")
    port = deploy_collecting(fleet, agent, "process")
    with hub_proxy(agent) as proxy:
        proxy.refuse("/device/data", 404)  # a hub older than the upload route
        agent.start()
        agent.wait_state("collects", "Healthy")
        assert_collected(score_and_read_spool(agent, port))


def test_the_docker_runtime_mounts_the_spool_into_the_container(
    fleet: Fleet, runtime_image: PushedRuntimeImage, docker_engine: Any
) -> None:
    device = f"dc-d{uuid.uuid4().hex[:6]}"  # the xdist workers share one Docker Engine
    agent = fleet.device(device, runtimes=(RuntimeKind.DOCKER,))
    repository = runtime_image.pinned.split("@", 1)[0]
    runtime = {"image": f"{repository}:pytest", "image_digest": runtime_image.digest}
    port = deploy_collecting(fleet, agent, "docker", runtime=runtime)
    with hub_proxy(agent) as proxy:
        proxy.refuse("/device/data", 404)  # a hub older than the upload route
        agent.start()
        agent.wait_state("collects", "Healthy", timeout=180)
        [container] = docker_engine.containers.list(filters={"label": f"edgepack.device={device}"})
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        assert mounts["/var/lib/edgepack/data"]["RW"] is True
        assert mounts["/var/lib/edgepack/data"]["Source"] == str(spool_dir(agent.state_dir, "collects"))
        assert_collected(score_and_read_spool(agent, port))
