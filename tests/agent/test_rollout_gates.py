"""A rollout's gate judged from what real agents measure: two devices run version 1 of a
service under steady traffic; version 2 answers every tenth request with an error. Deployed in
two waves with an error-rate gate, it reaches one device, whose scoring server counts the
errors, whose agent sends them in its telemetry, and the hub halts the rollout on them and
gives that device version 1 again."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent.conftest import Fleet, start_fleet, stop_fleet
from tests.agent.modules import files
from tests.conftest import Publisher, free_port
from tests.factory import SCORE_PY
from tests.hub.broker_fixtures import BrokerFactory
from tests.hub.conftest import HubFactory
from tests.waiting import wait_for

#: run() raises on every tenth request it gets: the scoring server counts those as errors.
FAILS_EVERY_TENTH = (
    SCORE_PY
    + b"""

_run = run
_seen = 0


def run(raw_data):
    global _seen
    _seen += 1
    if _seen % 10 == 0:
        raise ValueError("every tenth request fails in this version")
    return _run(raw_data)
"""
)

HOSTS = {"edge-1": "127.0.0.1", "edge-2": "127.0.0.2"}


@pytest.fixture
def fleet(
    hub: HubFactory, broker_factory: BrokerFactory, topic_prefix: str, publisher: Publisher, tmp_path: Path
) -> Iterator[Fleet]:
    running = start_fleet(hub, broker_factory, topic_prefix, publisher, tmp_path, rollout_interval_s=0.5)
    yield running
    stop_fleet(running)


class Traffic:
    """Requests to the service on every device, on a thread; failed connections (a device
    switching versions) are simply tried again."""

    def __init__(self, port: int) -> None:
        self._urls = [f"http://{host}:{port}/score" for host in HOSTS.values()]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        # A connection per request, as independent callers would: each lands on whichever
        # instance listens now.
        while not self._stop.wait(0.01):
            for url in self._urls:
                try:
                    httpx.post(url, json={"data": [1]}, timeout=10)
                except httpx.HTTPError:
                    continue


def test_an_error_rate_gate_halts_a_rollout_on_real_agents_telemetry(fleet: Fleet) -> None:
    for device_id, host in HOSTS.items():
        fleet.device(device_id, service_host=host).start()
    port = free_port()
    v1 = fleet.push("digits", "1", files=files(SCORE_PY))
    v2 = fleet.push("digits", "2", files=files(FAILS_EVERY_TENTH))
    fleet.deploy("digits", v1, port=port, selector="fleet=test")
    fleet.wait_rollup("digits", "Healthy")
    config = {"computeType": "local", "port": port, "edgepack": {"runtime": "process"}}
    with Traffic(port):
        with fleet.http() as http:
            r = http.put(
                "/api/v1/deployments/digits",
                json={"module": "digits", "version": "2", "deployment_config": config,
                      "target": {"selector": "fleet=test"},
                      "rollout": {"waves": "50%,100%", "bake": "6s", "gates": ["error_rate<2%"]}},
            )  # fmt: skip
        assert r.status_code == 200, r.text
        [wave_one] = r.json()["issued"]

        def verdict() -> dict[str, Any] | None:
            with fleet.http() as http:
                rollout: dict[str, Any] = http.get("/api/v1/deployments/digits/rollout").json()
            return None if rollout["state"] == "running" else rollout

        logs = lambda: "\n".join(a.log() for a in fleet.agents)  # noqa: E731
        done = wait_for(verdict, timeout=120, what="the rollout's verdict", log=logs)
    assert done["state"] == "rolled-back", done
    said = re.match(r"Halted: wave 1 \(1 device\): error rate ([\d.]+)% vs 0\.0% on 1 ", done["status"])
    assert said is not None, done["status"]
    assert 5 <= float(said.group(1)) <= 15  # every tenth request, as the device counted them
    # The wave's device was given version 1 again; the other never left it.
    service = fleet.wait_rollup("digits", "Healthy")
    assert service["version"] == "1"
    assert {d["device_id"]: d["serving_version"] for d in service["devices"]} == {
        "edge-1": "1",
        "edge-2": "1",
    }
    assert wave_one in HOSTS
    assert v2.manifest.version == "2"
