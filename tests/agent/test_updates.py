"""Updates, rollbacks and restarts on a real device set-up (process runtime)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from manifests.digests import sha256_digest
from tests.agent.conftest import Agent, Fleet, answers_with, free_port, score, wait_for
from tests.agent.modules import CRASHES_AFTER_START, CRASHES_ONCE, FAILING_INIT, HANGS_ON_REQUEST, files
from tests.factory import SCORE_PY
from tests.load import Load

FAST_RESTARTS = {"restart": {"base_s": 0.2, "cap_s": 1.0, "crash_loop_limit": 3}}


def steady_load(port: int) -> Load:
    """Two keep-alive clients posting ``{"data": [1]}``: the factor model answers ``[factor]``."""
    return Load(port, b'{"data": [1]}', lambda body: int(body["result"][0]))


def test_an_update_switches_versions_without_a_failed_request_and_fetches_only_what_changed(
    fleet: Fleet,
) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    big_model = b"w" * (2 << 20)
    fleet.deploy("demo", fleet.push("demo", "1", files=files(factor=2, padding=big_model)), port=port,
                 devices=["edge-1"])  # fmt: skip
    fleet.wait_rollup("demo", "Healthy")
    before = agent.status()["downloads"]
    assert before["blobs"] == 3
    # Version 2 changes the entry script only (it now triples): one blob to download.
    script = SCORE_PY.replace(b"x * factor", b"x * factor * 3 // 2")
    v2 = fleet.push("demo", "2", files={**files(factor=2, padding=big_model), "src/score.py": script})
    with steady_load(port) as load:
        time.sleep(0.3)
        fleet.deploy("demo", v2, port=port, devices=["edge-1"])
        agent.wait_state("demo", "Healthy", version="2")
        wait_for(lambda: load.answers[3] > 20, what="answers from version 2")
    assert load.failures == [], load.failures[:3]
    assert load.answers[2] > 0 and load.answers[3] > 0
    after = agent.status()["downloads"]
    assert after["blobs"] - before["blobs"] == 1, "only the changed file is downloaded"
    assert after["bytes"] - before["bytes"] == len(script)
    assert fleet.wait_rollup("demo", "Healthy")["version"] == "2"


def test_a_broken_version_is_abandoned_and_the_last_good_one_keeps_serving(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    v2 = fleet.push("demo", "2")
    fleet.deploy("demo", v2, port=port, devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    fleet.deploy("demo", fleet.push("demo", "3", files=files(FAILING_INIT)), port=port, devices=["edge-1"])
    body = fleet.wait_rollup("demo", "Failed")
    reason = body["devices"][0]["reason"]
    assert reason == (
        "score.py:2 RuntimeError: model could not be loaded: weights are corrupt; "
        "rolled back to version 2, which keeps serving"
    )
    assert "weights are corrupt" in body["devices"][0]["failure"]["traceback"]
    assert score(port, [1, 2]) == {"result": [2, 4]}, "version 2 still answers"
    status = agent.service("demo")
    assert status is not None and status["state"] == "Failed" and status["serving_version"] == "2"
    # The failed version is not retried: the same bytes would fail the same way.
    time.sleep(1.5)
    assert "weights are corrupt" in (agent.service("demo") or {})["reason"]
    assert agent.log().count("demo: version 3 failed") == 1

    # The team reverts the release: version 2 serves already, so it is Healthy, not restarted.
    fleet.deploy("demo", v2, port=port, devices=["edge-1"])
    reverted = wait_for(lambda: (s := agent.service("demo")) and s["version"] == "2" and s, log=agent.log,
                        what="the reverted desired state applied")  # fmt: skip
    # At once, not after a probe: 'service wait' ends on the first Failed it sees.
    assert reverted["state"] == "Healthy" and reverted["reason"] is None, reverted
    assert reverted["pid"] == status["pid"]
    fleet.wait_rollup("demo", "Healthy")


def restarted(agent: Agent, *, other_than: int | None = None) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        s = agent.service("demo")
        if s and s["restarts"] >= 1 and s["state"] == "Healthy" and s["pid"] != other_than:
            return s
        return None

    return check


def test_a_module_that_crashes_is_restarted_and_its_restarts_counted(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.device("edge-1", **FAST_RESTARTS).start()
    port = free_port()
    marker = tmp_path / "crashed-once"
    module = fleet.push("demo", "1", files=files(CRASHES_ONCE))
    env = {"CRASH_MARKER": str(marker)}
    fleet.deploy("demo", module, port=port, devices=["edge-1"], environmentVariables=env)
    status = wait_for(restarted(agent), what="a restart after the crash", log=agent.log)
    assert marker.exists()
    assert score(port, [5]) == {"result": [10]}
    assert status["restarts"] == 1


def test_a_crash_loop_ends_failed_with_the_modules_last_log_lines(fleet: Fleet) -> None:
    agent = fleet.device("edge-1", **FAST_RESTARTS).start()
    fleet.deploy("demo", fleet.push("demo", "1", files=files(CRASHES_AFTER_START)), port=free_port(),
                 devices=["edge-1"])  # fmt: skip
    body = fleet.wait_rollup("demo", "Failed", timeout=60)
    reason = body["devices"][0]["reason"]
    assert reason.startswith("crash loop: failed 3 times in a row; version 1 exited with code 3"), reason
    assert "about to crash" in body["devices"][0]["failure"]["log_tail"]
    # The two restarts before the verdict count, whether or not their instance answered before
    # it died; a Failed service is still retried at the capped delay, so more may follow.
    assert agent.service("demo")["restarts"] >= 2  # type: ignore[index]


def group_running(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that still run (zombies do not: they hold no
    socket any more)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(stat.parent.name))
    return out


class TimedCalls:
    """One client calling ``/score`` without pause on a fresh connection each time (so the
    kernel picks a listener of the port group for every call), noting when each call failed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.failures: list[tuple[float, str]] = []  # (time.monotonic() of the failure, what)
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = httpx.post(f"http://127.0.0.1:{self.port}/score", json={"data": [4]}, timeout=20,
                               headers={"Connection": "close"})  # fmt: skip
                r.raise_for_status()
                self.answered += 1
            except Exception as exc:
                self.failures.append((time.monotonic(), repr(exc)))
                time.sleep(0.01)

    def __enter__(self) -> TimedCalls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_a_module_that_stops_answering_its_probe_goes_unhealthy_and_is_restarted(fleet: Fleet) -> None:
    agent = fleet.device("edge-1", **FAST_RESTARTS).start()
    port = free_port()
    probe = {"periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 2}
    module = fleet.push("demo", "1", files=files(HANGS_ON_REQUEST))
    fleet.deploy("demo", module, port=port, devices=["edge-1"], probe=probe)
    fleet.wait_rollup("demo", "Healthy")
    first_pid = agent.service("demo")["pid"]  # type: ignore[index]
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(f"http://127.0.0.1:{port}/score", json={"data": ["hang"]}, timeout=0.5)
    # A client calls through the restart: calls the kernel hands the hung instance fail until
    # it is gone, but once the service is called Healthy again, every call is answered.
    with TimedCalls(port) as calls:
        unhealthy = agent.wait_state("demo", "Unhealthy", timeout=30)
        assert "missed 2 health probes" in unhealthy["reason"]
        healthy = wait_for(restarted(agent, other_than=first_pid), what="the restarted module", log=agent.log)
        healthy_seen = time.monotonic()
        # The hung instance left the port group before its successor was called Healthy: the
        # kernel hands it no call any more (without tcp_migrate_req, what it held is reset).
        assert group_running(first_pid) == [], "the hung instance still runs after Healthy"
        answered = calls.answered
        wait_for(lambda: calls.answered > answered + 20, what="calls answered after the restart")
        time.sleep(1.5)  # past the 1 s a hung predecessor was once given to drain
    late = [what for at, what in calls.failures if at >= healthy_seen]
    assert late == [], f"{len(late)} call(s) failed after Healthy: {late[:3]}"
    assert healthy["restarts"] == 1
    assert score(port, [4]) == {"result": [8]}


def test_a_newer_version_arriving_during_a_download_takes_over(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    huge = fleet.push("demo", "1", files=files(padding=b"h" * (64 << 20)))
    fleet.deploy("demo", huge, port=port, devices=["edge-1"])
    def downloading() -> bool:
        return "downloading" in ((agent.service("demo") or {}).get("reason") or "")

    wait_for(downloading, what="the download", interval=0.01)
    fleet.deploy("demo", fleet.push("demo", "2"), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy", version="2")
    assert score(port, [1]) == {"result": [2]}
    assert fleet.wait_rollup("demo", "Healthy")["version"] == "2"


def test_old_versions_are_garbage_collected_keeping_the_serving_and_the_previous_one(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    digests = []
    for version, factor in (("1", 2), ("2", 3), ("3", 4)):
        module = fleet.push("demo", version, files=files(factor=factor))
        digests.append(module.manifest_digest)
        fleet.deploy("demo", module, port=port, devices=["edge-1"])
        agent.wait_state("demo", "Healthy", version=version)
    modules = agent.state_dir / "cache" / "modules"
    blob_dir = agent.state_dir / "cache" / "blobs" / "sha256"
    v1_model = sha256_digest(files(factor=2)["model/model.json"])

    def collected() -> set[str] | None:
        # One prune removes the module folders first and the blobs no kept module uses after
        # them: wait for both steps, not only the first.
        held = {"sha256:" + p.name for p in modules.iterdir() if not p.name.startswith(".")}
        blobs = {"sha256:" + p.name for p in blob_dir.iterdir()}
        return blobs if held == set(digests[1:]) and v1_model not in blobs else None

    # Version 1 and its model blob go; the entry script, shared by all three, stays.
    blobs = wait_for(collected, what="version 1 and its model blob to be collected", log=agent.log)
    assert v1_model not in blobs
    assert sha256_digest(SCORE_PY) in blobs
    answers_with(port, [1], {"result": [4]})


CHATTY = SCORE_PY + b"""

_plain_run = run


def run(raw_data):
    print("x" * 2000, flush=True)
    return _plain_run(raw_data)
"""


def test_a_modules_log_is_rotated_and_still_served_through_the_hub(fleet: Fleet) -> None:
    agent = fleet.device("edge-1", max_log_bytes=64 << 10).start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1", files=files(CHATTY)), port=port, devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    for _ in range(200):  # about 400 kB of output
        score(port, [1])
    run_dir = next(agent.state_dir.glob("run/demo/*/module.log")).parent
    wait_for(lambda: (run_dir / "module.log.1").exists(), timeout=20, what="a rotation", log=agent.log)
    time.sleep(2.5)  # another telemetry tick: the log is kept under the limit
    assert (run_dir / "module.log").stat().st_size <= (64 << 10) + 200 * 2100
    with fleet.http() as http:
        answer = http.get("/api/v1/deployments/demo/logs", params={"device": "edge-1", "tail": 10})
    lines = answer.json()["lines"]
    assert len(lines) == 10 and all(line == "x" * 2000 for line in lines[-3:])


def test_a_version_that_crash_loops_after_the_switch_is_abandoned_for_the_previous_one(fleet: Fleet) -> None:
    agent = fleet.device("edge-1", **FAST_RESTARTS).start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    v1_pid = agent.wait_state("demo", "Healthy")["pid"]

    def rolled_back() -> dict[str, Any] | None:
        s = agent.service("demo")
        return s if s and s["state"] == "Failed" and s["serving_version"] == "1" and s["alive"] else None

    # A client calls all through the crash loop: version 1 keeps serving beside version 2 (which
    # has never been healthy for its settle time), so only a call that version 2 holds when it
    # dies can fail, one per crash at most (the client waits for each answer).
    with TimedCalls(port) as calls:
        fleet.deploy("demo", fleet.push("demo", "2", files=files(CRASHES_AFTER_START, factor=5)), port=port,
                     devices=["edge-1"])  # fmt: skip
        status = wait_for(rolled_back, timeout=60, what="the rollback to version 1", log=agent.log)
    crashes = FAST_RESTARTS["restart"]["crash_loop_limit"]
    assert len(calls.failures) <= crashes, (calls.answered, calls.failures[:5])
    assert calls.answered > 20
    assert "crash loop" in status["reason"] and "rolled back to version 1" in status["reason"]
    assert status["pid"] == v1_pid, "version 1 kept serving: it was not started again"
    assert score(port, [1]) == {"result": [2]}
    body = fleet.wait_rollup("demo", "Failed")
    # The reason stays one line; what the module printed before it died is its detail.
    assert "about to crash" in body["devices"][0]["failure"]["log_tail"]
    assert "about to crash" not in body["devices"][0]["reason"]


def test_a_deleted_service_stops_and_its_files_leave_the_device(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy")
    with fleet.http() as http:
        assert http.delete("/api/v1/deployments/demo").status_code == 200
    wait_for(lambda: agent.service("demo") is None, what="the service to be forgotten", log=agent.log)
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"http://127.0.0.1:{port}/score", json={"data": [1]}, timeout=2)
    cache = agent.state_dir / "cache"

    def emptied() -> bool:
        modules = [p for p in (cache / "modules").iterdir() if not p.name.startswith(".")]
        blobs = list((cache / "blobs" / "sha256").iterdir())
        return not modules and not blobs

    wait_for(emptied, what="the cache to be emptied", log=agent.log)
