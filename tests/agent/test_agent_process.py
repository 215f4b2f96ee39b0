"""The agent on a real device set-up: a real hub and broker, the agent as its own process,
modules as real processes, requests to their real ports."""

from __future__ import annotations

from tests.agent.conftest import Fleet, free_port, score


def test_a_deployment_becomes_healthy_and_serves_what_the_module_computes(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    module = fleet.push("demo", "1")
    port = free_port()
    fleet.deploy("demo", module, port=port, devices=["edge-1"])
    body = fleet.wait_rollup("demo", "Healthy")
    assert [d["state"] for d in body["devices"]] == ["Healthy"]
    assert body["devices"][0]["endpoint"] == f"http://127.0.0.1:{port}"
    assert body["devices"][0]["serving_version"] == "1"
    assert score(port, [1, 2, 3]) == {"result": [2, 4, 6]}
    status = agent.wait_state("demo", "Healthy")
    assert status["serving_version"] == "1" and status["port"] == port and status["alive"]
