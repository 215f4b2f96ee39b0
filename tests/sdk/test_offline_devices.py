"""An offline device is named as such by deploy, wait and logs, and a wait that can only wait
for offline devices ends at once (unless asked to keep waiting).

A real hub with its Mosquitto and a real agent, stopped: its last ``online=false`` is what the
hub knows it by.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from packager.sdk import DeploymentTimeout, DevicesOffline, HubDeviceOffline, Service
from tests.agent.conftest import Fleet, free_port
from tests.sdk.conftest import sdk_hub
from tests.sdk.test_deploy import edgepack_cli
from tests.waiting import wait_for

OFFLINE = re.compile(r"edge-1 is offline \(last seen \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)")


def test_deploy_wait_and_logs_say_a_device_is_offline_and_wait_ends_early(
    fleet: Fleet, sdk_home: Path, tmp_path: Path
) -> None:
    agent = fleet.device("edge-1").start()
    parts = fleet.push("demo", "1")
    fleet.deploy("demo", parts, port=free_port(), devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    assert edgepack_cli(fleet, "service", "logs", "demo", "--device", "edge-1").returncode == 0

    agent.stop()
    wait_for(lambda: not fleet.hub_device("edge-1")["online"] or None, what="edge-1 offline at the hub")

    # deploy (a new version): done at the hub, and a warning that the device cannot take it now.
    fleet.push("demo", "2")
    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(
        json.dumps({"computeType": "local", "port": free_port(), "edgepack": {"runtime": "process"}})
    )
    deployed = edgepack_cli(
        fleet, "deploy", "-n", "demo", "-m", "demo:2", "--dc", str(dc), "--target", "device:edge-1"
    )
    assert deployed.returncode == 0, deployed.stderr
    assert OFFLINE.search(deployed.stderr) and "when its agent reconnects" in deployed.stderr, deployed.stderr

    # wait: ends with exit 5 after its 10 s grace, not after its 600 s timeout.
    start = time.monotonic()
    waited = edgepack_cli(fleet, "service", "wait", "demo", "--interval", "0.2")
    assert waited.returncode == 5, (waited.stdout, waited.stderr)
    assert time.monotonic() - start < 30
    assert OFFLINE.search(waited.stderr) and "--wait-offline" in waited.stderr, waited.stderr
    # In a pipe the state line says it too.
    assert "demo on edge-1: " in waited.stdout and "offline (last seen" in waited.stdout, waited.stdout

    # --wait-offline: keeps waiting, until its own timeout, which names the device as offline.
    kept = edgepack_cli(
        fleet, "service", "wait", "demo", "--wait-offline", "--timeout", "2", "--interval", "0.2"
    )
    assert kept.returncode == 5 and "did not settle within 2s" in kept.stderr, kept.stderr
    assert re.search(r"on edge-1 \(offline, last seen \d{4}-\d\d-\d\d ", kept.stderr), kept.stderr

    # The SDK's wait_for_deployment, the same.
    with sdk_hub(fleet.hub) as hub:
        service = Service(hub, "demo")
        with pytest.raises(DevicesOffline) as offline:
            service.wait_for_deployment(timeout=600, interval=0.2, offline_grace=1)
        assert OFFLINE.search(str(offline.value)) and offline.value.exit_code == 5
        assert [d.device_id for d in offline.value.offline] == ["edge-1"]
        with pytest.raises(DeploymentTimeout) as timed_out:
            service.wait_for_deployment(timeout=1, interval=0.2, wait_offline=True)
        assert not isinstance(timed_out.value, DevicesOffline)

        # logs: answered at once (not a 504 after the 10 s the hub waits for a device).
        start = time.monotonic()
        with pytest.raises(HubDeviceOffline) as no_logs:
            service.logs("edge-1")
        assert time.monotonic() - start < 5
        assert no_logs.value.status == 503 and no_logs.value.kind == "DeviceOffline"
        assert OFFLINE.search(str(no_logs.value).replace("'edge-1'", "edge-1")), str(no_logs.value)
    logs = edgepack_cli(fleet, "service", "logs", "demo", "--device", "edge-1")
    assert logs.returncode == 4 and "offline" in logs.stderr, logs.stderr

    # Back online: the same wait succeeds, and the logs come.
    agent.start()
    wait_for(lambda: fleet.hub_device("edge-1")["online"] or None, what="edge-1 online at the hub")
    back = edgepack_cli(fleet, "service", "wait", "demo", "--timeout", "120", "--interval", "0.2")
    assert back.returncode == 0, back.stderr
    assert edgepack_cli(fleet, "service", "logs", "demo", "--device", "edge-1").returncode == 0
