"""Healthy means the version the desired state asks for serves; what the device does while it
cannot run that version yet, and how soon it moves to a newer one (process runtime)."""

from __future__ import annotations

import time
from typing import Any

from tests.agent.conftest import Agent, Fleet, answers_with, free_port, score
from tests.agent.hub_proxy import hub_proxy
from tests.agent.modules import files
from tests.waiting import wait_for

#: probes every second, so a probe result lands within each second of watching
QUICK_PROBE = {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 3}


def watch(agent: Agent, seconds: float) -> list[dict[str, Any]]:
    """The service's status, every 50 ms for ``seconds``."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = agent.service("demo")
        if status is not None:
            seen.append(status)
        time.sleep(0.05)
    return seen


def test_a_version_that_cannot_be_fetched_yet_is_never_called_healthy_while_the_old_one_serves(
    fleet: Fleet,
) -> None:
    agent = fleet.device("edge-1")
    with hub_proxy(agent) as proxy:
        agent.start()
        port = free_port()
        fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"], probe=QUICK_PROBE)
        agent.wait_state("demo", "Healthy", version="1")
        v2 = fleet.push("demo", "2", files=files(factor=3))
        proxy.refuse(f"/manifests/{v2.manifest_digest}", 503)
        fleet.deploy("demo", v2, port=port, devices=["edge-1"], probe=QUICK_PROBE)
        wait_for(lambda: "retrying" in ((agent.service("demo") or {}).get("reason") or ""),
                 what="the retry of version 2", log=agent.log)  # fmt: skip
        seen = watch(agent, 3.0)  # three probes of version 1, which answers them
        assert {s["state"] for s in seen} == {"Transitioning"}, [(s["state"], s["reason"]) for s in seen]
        assert {(s["version"], s["serving_version"]) for s in seen} == {("2", "1")}
        assert score(port, [1]) == {"result": [2]}, "version 1 keeps serving"
        row = fleet.rollup("demo")
        assert row["state"] != "Healthy", row
        assert row["devices"][0]["state"] == "Transitioning", row


def test_a_runtime_the_device_lacks_stays_unschedulable_and_names_the_version_that_serves(
    fleet: Fleet,
) -> None:
    agent = fleet.device("edge-1").start()  # the process runtime only
    port = free_port()
    module = fleet.push("demo", "1")
    fleet.deploy("demo", module, port=port, devices=["edge-1"], probe=QUICK_PROBE)
    agent.wait_state("demo", "Healthy")
    fleet.deploy("demo", module, port=port, devices=["edge-1"], runtime="docker", probe=QUICK_PROBE)
    agent.wait_state("demo", "Unschedulable")
    seen = watch(agent, 3.0)
    assert {s["state"] for s in seen} == {"Unschedulable"}, [(s["state"], s["reason"]) for s in seen]
    reason = seen[-1]["reason"]
    assert "runtime docker is not enabled" in reason and "version 1 (process) keeps serving" in reason, reason
    assert seen[-1]["serving_version"] == "1" and seen[-1]["runtime"] == "process"
    assert score(port, [1]) == {"result": [2]}
    row = fleet.wait_rollup("demo", "Unschedulable")
    assert "version 1 (process) keeps serving" in row["devices"][0]["reason"], row


def test_a_new_target_does_not_wait_out_the_retry_timer_of_the_one_it_replaces(fleet: Fleet) -> None:
    agent = fleet.device("edge-1")
    with hub_proxy(agent) as proxy:
        agent.start()
        port = free_port()
        fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
        agent.wait_state("demo", "Healthy", version="1")
        v2 = fleet.push("demo", "2", files=files(factor=3))
        proxy.refuse(f"/manifests/{v2.manifest_digest}", 503, retry_after_s=55)
        fleet.deploy("demo", v2, port=port, devices=["edge-1"])
        wait_for(lambda: "retrying in 55s" in ((agent.service("demo") or {}).get("reason") or ""),
                 what="the 55 s retry of version 2", log=agent.log)  # fmt: skip
        deployed = time.monotonic()
        fleet.deploy("demo", fleet.push("demo", "5", files=files(factor=5)), port=port, devices=["edge-1"])
        agent.wait_state("demo", "Healthy", version="5", timeout=55)
        assert time.monotonic() - deployed < 10, "version 5 waited for version 2's retry timer"
        answers_with(port, [1], {"result": [5]})


def test_an_error_outside_edgepacks_tree_is_retried_never_final(fleet: Fleet) -> None:
    agent = fleet.device("edge-1")
    # A file where the service's run folder goes: starting it raises NotADirectoryError, an
    # OSError and no verdict on the version (issue 15 saw FileNotFoundError from a cache race).
    obstacle = agent.state_dir / "run" / "demo"
    obstacle.parent.mkdir(parents=True)
    obstacle.write_text("in the way")
    agent.start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    retrying = wait_for(lambda: (s := agent.service("demo")) and "retrying" in (s["reason"] or "") and s,
                        what="the retry after the unexpected error", log=agent.log)  # fmt: skip
    assert retrying["state"] == "Transitioning" and "NotADirectoryError" in retrying["reason"], retrying
    obstacle.unlink()
    agent.wait_state("demo", "Healthy", timeout=30)
    assert score(port, [1]) == {"result": [2]}
