"""A deployment with ``dataCollection`` on a real agent (process runtime) and a real hub: the
agent hands the module its spool, an unchanged Azure script's records land in it, and a hub
that has no upload route yet (404: devices are upgraded first) costs no record."""

from __future__ import annotations

import gzip

import httpx

from edge_agent.data.spool import list_spool, spool_dir
from manifests.data import CollectedRecord
from tests.agent.conftest import Fleet, free_port
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


def test_the_agent_gives_a_collecting_service_its_spool_and_keeps_what_the_hub_cannot_take(
    fleet: Fleet,
) -> None:
    agent = fleet.device("dc-1")
    parts = fleet.push("collects", "1", files={"src/score.py": AZURE_SCORE_PY, "model/model.json": b"{}"})
    port = free_port()
    config = {
        "computeType": "local",
        "port": port,
        "dataCollection": {"storageEnabled": True},
        "edgepack": {"runtime": "process"},
    }
    with fleet.http() as http:
        r = http.put(
            "/api/v1/deployments/collects",
            json={"module": parts.manifest.name, "version": "1", "deployment_config": config,
                  "target": {"devices": ["dc-1"]}},
        )  # fmt: skip
    assert r.status_code in (200, 201), r.text
    agent.start()
    agent.wait_state("collects", "Healthy")
    for i in range(5):
        answer = httpx.post(
            f"http://127.0.0.1:{port}/score", json={"data": [[i, 1]]}, headers={"x-ms-request-id": f"req-{i}"}
        )
        assert answer.status_code == 200 and answer.headers["x-ms-request-id"] == f"req-{i}"
    folder = spool_dir(agent.state_dir, "collects")
    # The segment closes after its age (10 s); the hub answers the upload 404, so it stays.
    segments = wait_for(lambda: list_spool(folder).segments, timeout=60, what="a segment", log=agent.log)
    wait_for(lambda: "data upload waits" in agent.log(), timeout=30, what="an upload tried", log=agent.log)
    records = [
        CollectedRecord.model_validate_json(line)
        for s in list_spool(folder).segments
        for line in gzip.decompress(s.path.read_bytes()).splitlines()
    ]
    assert segments and [r.correlation_id for r in records] == [f"req-{i}" for i in range(5)]
    assert {(r.service, r.model, r.model_version, r.designation) for r in records} == {
        ("collects", "digits", "1", "inputs")
    }
    assert [r.data for r in records] == [[[i, 1]] for i in range(5)]
