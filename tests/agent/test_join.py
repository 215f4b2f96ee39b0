"""Zero-touch enrolment with real parts: an admin makes a provisioning token, a device joins
with ``edgepack agent join`` (its own key, only a signed request sent), its agent goes Healthy
with the module its token's tags select, over the real broker with the account the join made.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from manifests.device import parse_agent_config, render_agent_config
from tests.agent.conftest import Agent, Fleet, free_port, score, wait_for
from tests.hub.test_fleet_cli import EDGEPACK, env_for


def _cli(fleet: Fleet, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEPACK, *args], env=env_for(home, fleet.hub), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_device_joins_with_a_token_and_goes_healthy_and_its_secrets_never_reach_the_hub(
    fleet: Fleet, tmp_path: Path
) -> None:
    home = tmp_path / "admin"
    made = _cli(fleet, home, "device", "token", "create", "--tags", "site=berlin,name={id}", "--uses", "5",
                "--expires", "1h", "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    module = fleet.push("demo", "1")
    port = free_port()
    fleet.deploy("demo", module, port=port, selector="site=berlin")

    folder = tmp_path / "device"
    joined = _cli(fleet, tmp_path / "device-home", "agent", "join", fleet.hub.url, "--token", token,
                  "--id-from", "edge-j1", "--state", str(folder))  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    assert "joined" in joined.stdout and "edge-j1" in joined.stdout

    # The key and the credentials are the device's own, readable by it alone.
    for name in ("device-key.pem", "credentials.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    credentials = json.loads((folder / "credentials.json").read_text())
    assert credentials["device_id"] == "edge-j1"
    # The device's tags come from the token's template.
    assert fleet.hub_device("edge-j1")["tags"] == {"site": "berlin", "name": "edge-j1"}

    # The agent runs from the agent.toml the join wrote (with this test's interpreter and address).
    config_path = folder / "agent.toml"
    config = parse_agent_config(config_path.read_bytes(), source="agent.toml", base_dir=folder)
    config = config.model_copy(
        update={"service_host": "127.0.0.1", "telemetry_interval_s": 1, "process": config.process.model_copy(
            update={"python": fleet.checkout_python()})}
    )  # fmt: skip
    config_path.write_text(render_agent_config(config))
    agent = Agent(fleet, "edge-j1", config_path, credentials)
    fleet.agents.append(agent)
    agent.start()
    agent.wait_state("demo", "Healthy", timeout=90)
    fleet.wait_rollup("demo", "Healthy", timeout=60)
    assert score(port, [1, 2, 3]) == {"result": [2, 4, 6]}

    # Neither secret the device authenticates with was ever sent: nothing the hub wrote holds them.
    secrets = (credentials["token"].encode(), credentials["mqtt"]["password"].encode())
    for path in fleet.hub.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s in data for s in secrets), path

    # A second join of the same device (its credentials exist) is refused on the device itself.
    again = _cli(fleet, tmp_path / "device-home", "agent", "join", fleet.hub.url, "--token", token,
                 "--id-from", "edge-j1", "--state", str(folder))  # fmt: skip
    assert again.returncode != 0 and "has joined already" in again.stderr
    assert os.path.exists(folder / "credentials.json")


def test_a_device_joining_with_an_approval_token_waits_until_the_admin_approves(
    fleet: Fleet, tmp_path: Path
) -> None:
    home = tmp_path / "admin"
    made = _cli(fleet, home, "device", "token", "create", "--approval", "--uses", "2", "--json")
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "device"
    joining = subprocess.Popen(
        [EDGEPACK, "agent", "join", fleet.hub.url, "--token", json.loads(made.stdout)["token"],
         "--id-from", "edge-w1", "--state", str(folder), "--wait", "120"],
        env=env_for(tmp_path / "device-home", fleet.hub),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def listed() -> bool:
            waiting = _cli(fleet, home, "device", "pending", "--json")
            return any(p["device_id"] == "edge-w1" for p in json.loads(waiting.stdout)["pending"])

        wait_for(listed, timeout=60, what="edge-w1 waiting for approval")
        assert joining.poll() is None and not (folder / "credentials.json").exists()
        approved = _cli(fleet, home, "device", "approve", "edge-w1")
        assert approved.returncode == 0 and "approved" in approved.stdout, approved.stderr
        _out, err = joining.communicate(timeout=60)
    finally:
        if joining.poll() is None:
            joining.kill()
    assert joining.returncode == 0, err
    assert json.loads((folder / "credentials.json").read_text())["device_id"] == "edge-w1"


def _processes_showing(secret: bytes) -> list[str]:
    """Every process whose command line or environment holds ``secret`` (this test runs as
    root, so it reads what any local user could read, and more)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            for part in ("cmdline", "environ"):
                try:
                    if secret in (entry / part).read_bytes():
                        found.append(f"{entry.name}/{part}")
                except OSError:  # gone meanwhile, or a kernel thread
                    pass
    return found


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_a_joining_device_never_shows_its_token_in_the_process_list(
    fleet: Fleet, tmp_path: Path, source: str
) -> None:
    # The join waits in the approval queue, so it is watched while it holds the token.
    home = tmp_path / "admin"
    made = _cli(fleet, home, "device", "token", "create", "--approval", "--uses", "1", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["token"]
    token_file = tmp_path / "join-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    device_id = f"edge-ps-{source}"
    given = str(token_file) if source == "file" else "-"
    argv = [EDGEPACK, "agent", "join", fleet.hub.url, "--token-file", given,
            "--id-from", device_id, "--state", str(tmp_path / "device"), "--wait", "120"]  # fmt: skip
    joining = subprocess.Popen(argv, env=env_for(tmp_path / "device-home", fleet.hub), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert joining.stdin is not None
    if source == "stdin":
        joining.stdin.write(token + "\n")
    joining.stdin.close()
    try:
        seen: list[str] = []

        def waiting() -> bool:
            seen.extend(_processes_showing(token.encode()))
            pending = _cli(fleet, home, "device", "pending", "--json")
            return any(p["device_id"] == device_id for p in json.loads(pending.stdout)["pending"])

        wait_for(waiting, timeout=60, what=f"{device_id} waiting for approval")
        assert joining.poll() is None
        seen.extend(_processes_showing(token.encode()))
        assert seen == []
        approved = _cli(fleet, home, "device", "approve", device_id)
        assert approved.returncode == 0, approved.stderr
        joining.wait(timeout=60)
    finally:
        if joining.poll() is None:
            joining.kill()
    assert joining.stderr is not None
    assert joining.returncode == 0, joining.stderr.read()
    assert json.loads((tmp_path / "device" / "credentials.json").read_text())["device_id"] == device_id
