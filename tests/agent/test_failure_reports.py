"""A module that fails is reported readably, and the failed version's log stays reachable (issue 17,
items 5 and 6), on a real hub, broker and agent (process runtime).

A team's ``init()`` cannot reach its feature store. The service says so in one line
(``score.py:6 RuntimeError: cannot open the feature store``); the traceback (once) and what the
script printed come beside it; ``edgepack service logs --failed`` prints the failed version's
output, also after a rollback (when plain ``service logs`` shows the version that serves and says
so) and when the service never started at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

from manifests.desired import RuntimeKind
from packager.sdk import Hub, Service
from tests.agent.conftest import Agent, Fleet, free_port, score, wait_for
from tests.agent.modules import files
from tests.agent.test_docker_runtime import pinned_module
from tests.docker_fixtures import PushedRuntimeImage
from tests.factory import SCORE_PY

#: init() prints where it connects, then raises at line 6
FEATURE_STORE = b'''\
import sys


def init():
    print("connecting to the feature store at /var/features", flush=True)
    raise RuntimeError("cannot open the feature store")


def run(raw_data):
    return raw_data
'''
CAUSE = "score.py:6 RuntimeError: cannot open the feature store"
#: version 1 works and says so in its log
ANNOUNCING = SCORE_PY + b'''

_init = init


def init():
    _init()
    print("version 1 loaded its factor", flush=True)
'''


def device(fleet: Fleet, device_id: str = "edge-1") -> Agent:
    return fleet.device(device_id).start()


def edgepack(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEPACK_HUB_URL": fleet.hub.url, "EDGEPACK_TOKEN": fleet.hub.admin_token}
    return subprocess.run([sys.executable, "-m", "packager", *args], capture_output=True, text=True, env=env)


def failed_row(fleet: Fleet) -> dict[str, Any]:
    body = fleet.wait_rollup("demo", "Failed")
    row: dict[str, Any] = body["devices"][0]
    return row


def assert_readable(row: dict[str, Any], reason: str) -> None:
    assert row["reason"] == reason, row["reason"]
    assert len(row["reason"]) < 200 and "\n" not in row["reason"]
    failure = row["failure"]
    assert failure is not None, row
    trace = failure["traceback"]
    assert trace.count("Traceback (most recent call last)") == 1, trace
    assert trace.endswith("RuntimeError: cannot open the feature store")
    assert 'score.py", line 6, in init' in trace
    assert "connecting to the feature store at /var/features" in failure["log_tail"]


def test_a_service_whose_init_raises_says_why_in_one_line_and_its_log_is_kept(fleet: Fleet) -> None:
    agent = device(fleet)
    fleet.deploy("demo", fleet.push("demo", "1", files=files(FEATURE_STORE)), port=free_port(),
                 devices=["edge-1"])  # fmt: skip
    row = failed_row(fleet)
    assert_readable(row, CAUSE)
    # The device's own page shows the same, from its report.
    module = next(m for m in fleet.hub_device("edge-1")["modules"] if m["service"] == "demo")
    assert module["reason"] == CAUSE and module["failure"] == row["failure"]

    # It never started: nothing serves, yet the failed version's output is there.
    failed = edgepack(fleet, "service", "logs", "demo", "--device", "edge-1", "--failed")
    assert failed.returncode == 0, failed.stderr
    assert "connecting to the feature store at /var/features" in failed.stdout
    assert "RuntimeError: cannot open the feature store" in failed.stdout
    assert "version 1" in failed.stderr
    plain = edgepack(fleet, "service", "logs", "demo", "--device", "edge-1")
    assert plain.returncode != 0 and "--failed" in plain.stderr, plain.stderr
    assert "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) == 1, plain.stderr

    # `service wait` ends on it in one line that says where the rest is.
    waited = edgepack(fleet, "service", "wait", "demo", "--timeout", "30")
    assert waited.returncode != 0
    said = " ".join(waited.stderr.split())
    assert CAUSE in said and "edgepack service logs demo --device edge-1 --failed" in said, said

    # `service show` gives the cause in its table and the detail under it.
    shown = edgepack(fleet, "service", "show", "demo")
    assert shown.returncode == 0, shown.stderr
    assert "traceback of demo version 1 on edge-1" in shown.stdout
    assert "last output of demo version 1 on edge-1" in shown.stdout

    shown = edgepack(fleet, "device", "show", "edge-1")
    assert shown.returncode == 0, shown.stderr
    assert "traceback of demo version 1 on edge-1" in shown.stdout
    assert 'score.py", line 6, in init' in shown.stdout

    # The kept log is the device's (0600) and goes with the service.
    kept = agent.state_dir / "failed-logs" / "demo.json"
    assert kept.stat().st_mode & 0o777 == 0o600
    with fleet.http() as http:
        assert http.delete("/api/v1/deployments/demo").status_code == 200
    wait_for(lambda: not kept.exists(), what="the failed log removed with the service", log=agent.log)


def test_after_a_rollback_the_failed_versions_log_is_one_flag_away(fleet: Fleet) -> None:
    agent = device(fleet)
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1", files=files(ANNOUNCING)), port=port, devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    fleet.deploy("demo", fleet.push("demo", "2", files=files(FEATURE_STORE)), port=port, devices=["edge-1"])
    row = failed_row(fleet)
    assert_readable(row, f"{CAUSE}; rolled back to version 1, which keeps serving")
    assert row["serving_version"] == "1"
    assert score(port, [2]) == {"result": [4]}, "version 1 still answers"

    failed = edgepack(fleet, "service", "logs", "demo", "--device", "edge-1", "--failed")
    assert failed.returncode == 0, failed.stderr
    assert "connecting to the feature store" in failed.stdout
    assert "version 1 loaded its factor" not in failed.stdout
    assert "version 2" in failed.stderr

    plain = edgepack(fleet, "service", "logs", "demo", "--device", "edge-1")
    assert plain.returncode == 0, plain.stderr
    assert "version 1 loaded its factor" in plain.stdout
    assert "connecting to the feature store" not in plain.stdout
    note = " ".join(plain.stderr.split())
    assert "version 1 serves on edge-1" in note and "version 2 failed there: add --failed" in note, note

    # The SDK says the same (Azure ML's get_logs, with failed=True).
    with Hub(fleet.hub.url, fleet.hub.admin_token, progress=False) as hub:
        text = Service(hub, "demo").get_logs(device="edge-1", failed=True)
    assert "connecting to the feature store" in text
    assert agent.proc is not None and agent.proc.poll() is None


def test_no_failed_log_is_one_clear_line(fleet: Fleet) -> None:
    device(fleet)
    fleet.deploy("demo", fleet.push("demo", "1"), port=free_port(), devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    result = edgepack(fleet, "service", "logs", "demo", "--device", "edge-1", "--failed")
    assert result.returncode == 2, result.stderr
    assert "no failed instance of service 'demo' has left a log on edge-1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_container_whose_init_raises_says_why_the_same_way(
    fleet: Fleet, runtime_image: PushedRuntimeImage, docker_engine: Any
) -> None:
    """In the docker runtime the scoring server writes its cause into the run folder the
    container mounts, as uid 10001 under a read-only root: the same line, traceback and log."""
    device_id = f"edge-f{uuid.uuid4().hex[:6]}"
    fleet.device(device_id, runtimes=(RuntimeKind.DOCKER,)).start()
    module = pinned_module(fleet, runtime_image, "1", files=files(FEATURE_STORE))
    fleet.deploy("demo", module, port=free_port(), devices=[device_id], runtime="docker")
    row = fleet.wait_rollup("demo", "Failed", timeout=180)["devices"][0]
    assert_readable(row, CAUSE)
    failed = edgepack(fleet, "service", "logs", "demo", "--device", device_id, "--failed")
    assert failed.returncode == 0, failed.stderr
    assert "connecting to the feature store at /var/features" in failed.stdout
