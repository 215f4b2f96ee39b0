"""Collected production data end to end: an Azure entry script that uses ModelDataCollector
unchanged, on a real agent whose hub is out of reach for a while (and whose agent restarts in
between), and the hub's stored data read back record by record through the CLI's API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx

from packager.sdk import Hub, Service
from tests.agent.conftest import Fleet, free_port
from tests.agent.hub_proxy import hub_proxy
from tests.waiting import wait_for

AZURE_SCORE_PY = b'''
import json

from azureml.monitoring import ModelDataCollector


def init():
    global inputs_dc, prediction_dc
    inputs_dc = ModelDataCollector("digits", designation="inputs", feature_names=["a", "b"])
    prediction_dc = ModelDataCollector("digits", designation="predictions", feature_names=["sum"])


def run(raw_data):
    data = json.loads(raw_data)["data"]
    inputs_dc.collect(data)
    result = [sum(row) for row in data]
    prediction_dc.collect(result)
    return result
'''


def stored(fleet: Fleet, service: str, out: Path) -> list[dict[str, Any]]:
    """Every record the hub holds for ``service``, downloaded as the SDK's users do."""
    shutil.rmtree(out, ignore_errors=True)
    with Hub(fleet.hub.url, fleet.hub.admin_token, progress=False) as hub:
        Service(hub, service).download_data(out)
    files = sorted(out.rglob("*.jsonl"))
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


def test_an_azure_script_collects_unchanged_and_nothing_is_lost_while_the_hub_is_away(
    fleet: Fleet, tmp_path: Path
) -> None:
    out = tmp_path / "downloaded"
    agent = fleet.device("dc-1")
    fleet.push("collects", "1", files={"src/score.py": AZURE_SCORE_PY, "model/model.json": b"{}"})
    port = free_port()
    with hub_proxy(agent) as proxy:
        agent.start()
        with fleet.http() as http:
            r = http.put(
                "/api/v1/deployments/collects",
                json={
                    "module": "collects",
                    "version": "1",
                    "deployment_config": {
                        "computeType": "local",
                        "port": port,
                        "dataCollection": {"storageEnabled": True},
                        "edgepack": {"runtime": "process"},
                    },
                    "target": {"devices": ["dc-1"]},
                },
            )
        assert r.status_code in (200, 201), r.text
        agent.wait_state("collects", "Healthy")
        proxy.refuse("/device/data", 503)  # the hub is out of reach for uploads
        sent: dict[str, list[list[int]]] = {}
        for i in range(40):
            rows = [[i, j] for j in range(3)]
            rid = f"req-{i:03d}"
            r = httpx.post(
                f"http://127.0.0.1:{port}/score", json={"data": rows}, headers={"x-ms-request-id": rid}
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-ms-request-id"] == rid
            sent[rid] = rows
        wait_for(lambda: len(proxy.refused) >= 1, what="an upload tried while the hub is away", log=agent.log)
        assert stored(fleet, "collects", out) == []
        agent.stop()
        agent.start()  # the spool is on disk: a restart loses nothing
        with proxy._lock:
            proxy.refusals.clear()
        every = lambda: len(stored(fleet, "collects", out)) >= 80  # noqa: E731
        wait_for(every, what="80 records on the hub", log=agent.log)
    records = stored(fleet, "collects", out)
    assert len(records) == 80, "each record once"
    inputs = {r["correlation_id"]: r for r in records if r["designation"] == "inputs"}
    predictions = {r["correlation_id"]: r for r in records if r["designation"] == "predictions"}
    assert set(inputs) == set(predictions) == set(sent)
    for rid, rows in sent.items():
        assert inputs[rid]["data"] == rows and inputs[rid]["feature_names"] == ["a", "b"]
        assert predictions[rid]["data"] == [sum(row) for row in rows]
        for record in (inputs[rid], predictions[rid]):
            where = (record["service"], record["model"], record["model_version"])
            assert where == ("collects", "digits", "1"), record
