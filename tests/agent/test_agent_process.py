"""The agent on a real device set-up: a real hub and broker, the agent as its own process,
modules as real processes, requests to their real ports."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from tests.agent.conftest import Fleet, free_port, score, wait_for


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


def test_a_state_folder_created_open_beforehand_is_made_private_on_start(fleet: Fleet) -> None:
    agent = fleet.device("edge-1")
    agent.state_dir.mkdir()
    agent.state_dir.chmod(0o777)  # an installer's mkdir under a loose umask, or a careless chmod
    agent.start()
    wait_for(lambda: agent.status()["agent_pid"], what="the agent running", log=agent.log)
    assert stat.S_IMODE(agent.state_dir.stat().st_mode) == 0o700
    assert f"state folder {agent.state_dir} was mode 0777; made it 0700" in agent.log()


def test_credentials_other_users_may_read_are_refused_with_the_chmod_to_run(fleet: Fleet) -> None:
    agent = fleet.device("edge-1")
    creds = agent.config.credentials
    creds.chmod(0o644)
    daemon = subprocess.run(
        [sys.executable, "-m", "edge_agent", "--config", str(agent.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    cli = subprocess.run(
        [sys.executable, "-m", "packager", "agent", "run", "--config", str(agent.config_path)],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    for run in (daemon, cli):
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1, run.stderr
        assert lines[0].startswith(f"error: {creds} is open to its group and other users (mode 0644)")
        assert f"run 'chmod 600 {creds}'" in lines[0]
    assert not agent.state_dir.exists()  # refused before it touched anything


def test_with_allow_open_credentials_the_agent_runs_and_warns(fleet: Fleet) -> None:
    agent = fleet.device("edge-1")
    creds = agent.config.credentials
    creds.chmod(0o640)
    agent.start("--allow-open-credentials")
    wait_for(lambda: agent.status()["agent_pid"], what="the agent running", log=agent.log)
    assert f"{creds} is open to its group (mode 0640)" in agent.log()
    assert "used anyway (--allow-open-credentials)" in agent.log()
