"""The agent stopping, dying and coming back; the hub, the broker and the disk failing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.agent.conftest import Fleet, answers_with, free_port, kill_modules, score, wait_for
from tests.agent.modules import files
from tests.hub.broker_fixtures import start_mosquitto


def test_sigterm_leaves_modules_serving_and_the_next_agent_adopts_them_unrestarted(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    first = agent.wait_state("demo", "Healthy")
    assert agent.stop() == 0
    assert score(port, [1]) == {"result": [2]}, "modules keep serving without their agent"
    offline = agent.status()
    assert offline["agent_pid"] is None and offline["services"][0]["alive"] is True
    agent.start()
    wait_for(lambda: "adopted demo" in agent.log(), what="the adoption", log=agent.log)
    time.sleep(1.0)
    again = agent.wait_state("demo", "Healthy")
    assert (again["pid"], again["restarts"]) == (first["pid"], 0), "a healthy module is not restarted"


def test_stop_modules_stops_them_with_the_agent(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start("--stop-modules")
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy")
    assert agent.stop() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"http://127.0.0.1:{port}/score", json={"data": [1]}, timeout=2)


def test_after_a_reboot_modules_serve_again_from_the_cache_with_hub_and_broker_down(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1", files=files(factor=4)), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy")
    # The power goes: every process dies at once. The device comes back with no network.
    agent.kill()
    assert kill_modules(agent.state_dir)
    fleet.hub.stop()
    fleet.broker.stop()
    started = time.monotonic()
    agent.start()
    wait_for(lambda: _answers(port), what="the module to serve after the reboot", log=agent.log)
    assert time.monotonic() - started < 20
    assert score(port, [1]) == {"result": [4]}
    status = agent.wait_state("demo", "Healthy")
    assert status["restarts"] == 1


def _answers(port: int) -> bool:
    try:
        return httpx.post(f"http://127.0.0.1:{port}/score", json={"data": [1]}, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_with_the_hub_away_modules_keep_serving_and_the_agent_catches_up_later(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy")
    fleet.hub.stop()
    time.sleep(1.5)
    assert score(port, [1]) == {"result": [2]}
    assert agent.proc is not None and agent.proc.poll() is None
    fleet.hub = fleet.hub.restart()
    fleet.deploy("demo", fleet.push("demo", "2", files=files(factor=3)), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy", version="2")
    answers_with(port, [1], {"result": [3]})


def test_a_broker_restart_in_the_middle_of_a_deployment_loses_nothing(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    wait_for(lambda: "connected to the broker" in agent.log(), what="the agent's connection", log=agent.log)
    broker = fleet.broker
    broker.stop()
    # Deployed while the broker is down: the hub stores it; the device hears of it over HTTP
    # when its broker connection comes back (and the retained message may be gone).
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    config = broker.config.read_text()
    fleet.broker = start_mosquitto(broker.config.parent, lambda _port: config, port=broker.port)
    try:
        agent.wait_state("demo", "Healthy", timeout=90)
        fleet.wait_rollup("demo", "Healthy", timeout=90)
        assert score(port, [2]) == {"result": [4]}
    finally:
        fleet.broker.stop()


def _partial_sizes(folder: Path) -> list[int]:
    sizes = []
    for path in folder.glob(".*.partial") if folder.is_dir() else []:
        # A download may finish (be renamed) between the listing and the look.
        with contextlib.suppress(FileNotFoundError):
            sizes.append(path.stat().st_size)
    return sizes


def test_an_agent_killed_in_the_middle_of_a_download_resumes_where_it_stopped(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    size = 96 << 20
    partial = agent.state_dir / "cache" / "blobs" / "sha256"
    # Loopback is fast: should a download finish before the kill lands, try a fresh one.
    for version in ("1", "2", "3"):
        module = fleet.push("demo", version, files=files(padding=os.urandom(64) + b"r" * size))
        fleet.deploy("demo", module, port=free_port(), devices=["edge-1"])
        wait_for(lambda: any(s > 8 << 20 for s in _partial_sizes(partial)), what="a download under way",
                 interval=0.005, log=agent.log)  # fmt: skip
        agent.kill()
        kept = max(_partial_sizes(partial), default=0)
        if 0 < kept < size:
            break
        agent.start()
    else:
        raise AssertionError("every download finished before the agent could be killed")
    before = agent.status()["downloads"]["bytes"]
    agent.start()
    agent.wait_state("demo", "Healthy", timeout=120)
    downloaded = agent.status()["downloads"]["bytes"] - before
    assert downloaded <= size + 64 - kept + (1 << 20), "the second agent resumed instead of starting over"
    assert not _partial_sizes(partial)


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mount_cmd = ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)]
    result = subprocess.run(mount_cmd, capture_output=True)
    assert result.returncode == 0, f"cannot mount a tmpfs (tests run as root): {result.stderr!r}"
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_module_that_does_not_fit_on_the_disk_is_unschedulable_with_the_numbers(
    fleet: Fleet, small_disk: Path
) -> None:
    agent = fleet.device("edge-1", state_dir=small_disk / "state").start()
    fleet.deploy("demo", fleet.push("demo", "1", files=files(padding=b"d" * (64 << 20))), port=free_port(),
                 devices=["edge-1"])  # fmt: skip
    body = fleet.wait_rollup("demo", "Unschedulable")
    reason = body["devices"][0]["reason"]
    assert "needs" in reason and "bytes of disk" in reason and "are free" in reason
    assert not list((small_disk / "state").glob("cache/blobs/sha256/.*.partial")), "nothing was downloaded"
    status = agent.status()
    assert status["downloads"]["bytes"] == 0


def test_modules_the_device_cannot_run_are_unschedulable_with_the_reason(fleet: Fleet) -> None:
    # The agent's own interpreter runs modules: their requirements are checked against it.
    agent = fleet.device("edge-1", process={"python": sys.executable}).start()
    fleet.deploy("in-docker", fleet.push("demo", "1"), port=free_port(), devices=["edge-1"], runtime="docker")
    body = fleet.wait_rollup("in-docker", "Unschedulable")
    assert "runtime docker is not enabled on this device" in body["devices"][0]["reason"]
    needy = fleet.push("needy", "1", runtime={"python": {"requirements": ["no-such-package-edgepack>=1"]}})
    fleet.deploy("needy", needy, port=free_port(), devices=["edge-1"])
    body = fleet.wait_rollup("needy", "Unschedulable")
    assert "lacks the module's Python requirements no-such-package-edgepack" in body["devices"][0]["reason"]
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: a port another program owns
        other_program.listen()
        held = other_program.getsockname()[1]
        fleet.deploy("blocked", fleet.push("blocked", "1"), port=held, devices=["edge-1"])
        body = fleet.wait_rollup("blocked", "Unschedulable")
        assert f"port {held} is held by another program" in body["devices"][0]["reason"]
    assert agent.proc is not None and agent.proc.poll() is None


def test_telemetry_from_the_device_reaches_the_hubs_charts(fleet: Fleet) -> None:
    fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    for _ in range(50):
        score(port, [1])

    def charted() -> list[dict[str, object]] | None:
        with fleet.http() as http:
            series = http.get("/api/v1/dashboard/telemetry", params={"bucket_s": 1}).json()["services"]
        points = series.get("demo", [])
        # p95 comes from the agent's two scrapes of the scoring server, like p50.
        latencies = ("p50_ms", "p95_ms")
        return points if any(p["rps"] and all(p[k] is not None for k in latencies) for p in points) else None

    points = wait_for(charted, timeout=30, what="a telemetry point with requests and latencies")
    assert points


def test_agent_status_answers_from_the_state_folder_alone(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy")
    agent.stop(signal.SIGTERM)
    fleet.hub.stop()
    result = subprocess.run(
        [sys.executable, "-m", "packager", "agent", "status", "--config", str(agent.config_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    service = status["services"][0]
    assert status["applied_generation"] >= 2 and status["agent_pid"] is None
    seen = (service["state"], service["version"], service["port"], service["restarts"])
    assert seen == ("Healthy", "1", port, 0)
    assert service["alive"] is True


def test_service_logs_come_from_the_device_through_the_hub(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    fleet.device("edge-2").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    score(port, [1])
    env = {**os.environ, "EDGEPACK_HUB_URL": fleet.hub.url, "EDGEPACK_TOKEN": fleet.hub.admin_token}
    cli = [sys.executable, "-m", "packager", "service", "logs", "demo"]
    args = [*cli, "--device", "edge-1", "--tail", "20"]
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 0 < len(lines) <= 20
    assert any("worker" in line or "Uvicorn" in line or "Started" in line for line in lines), lines
    # edge-2 does not run the service: nothing to fetch, one clear line, no waiting.
    result = subprocess.run([*cli, "--device", "edge-2"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "not deployed to device 'edge-2'" in result.stderr
    assert agent.proc is not None and agent.proc.poll() is None
