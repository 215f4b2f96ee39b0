"""Devices for the rollout tests: each reads its signed desired state over HTTP, as an agent
does, and reports over the real broker that it serves what it was given, with telemetry whose
requests fail (or are slow) as the test says a version does."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from manifests.desired import DesiredState
from manifests.signing import TrustStore
from tests.hub.broker_fixtures import MqttProbe
from tests.hub.conftest import RunningHub
from tests.hub.fleet_support import Enrolled, verified_state


@dataclass
class Behaviour:
    """What a version does on every device: the share of requests that fail, its p95."""

    error_share: float = 0.0
    p95_ms: float = 10.0
    fails_to_start: bool = False


@dataclass
class _Device:
    enrolled: Enrolled
    digest: str | None = None
    requests: int = 0
    errors: int = 0
    ever: set[str] = field(default_factory=set)
    last_report: object = None
    state: DesiredState | None = None


class SimFleet:
    """``tick()`` once: every device fetches its state, reports it, and sends a sample."""

    def __init__(
        self, hub: RunningHub, probe: MqttProbe, prefix: str, trust: TrustStore, service: str
    ) -> None:
        self.hub = hub
        self._probe = probe
        self._prefix = prefix
        self._trust = trust
        self._service = service
        self.devices: dict[str, _Device] = {}
        self.behaviour: dict[str, Behaviour] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, enrolled: Enrolled) -> None:
        self.devices[enrolled.id] = _Device(enrolled)
        self._probe.publish(f"{self._prefix}/devices/{enrolled.id}/online", b"true", retain=True)

    def ever_ran(self, digest: str) -> set[str]:
        return {d for d, dev in self.devices.items() if digest in dev.ever}

    def running(self, digest: str) -> set[str]:
        return {d for d, dev in self.devices.items() if dev.digest == digest}

    def _desired(self, http: httpx.Client, dev: _Device) -> DesiredState:
        """The device's state, fetched again only when its generation moved (the ETag)."""
        headers = {"Authorization": f"Bearer {dev.enrolled.token}"}
        if dev.state is not None:
            headers["If-None-Match"] = f'"{dev.state.generation}"'
        r = http.get("/api/v1/device/desired", headers=headers)
        if r.status_code == 304 and dev.state is not None:
            return dev.state
        assert r.status_code == 200, r.text
        dev.state = verified_state(r.content, self._trust, dev.enrolled.id)
        return dev.state

    def tick(self) -> None:
        now = datetime.now(UTC).isoformat()
        with httpx.Client(base_url=self.hub.url, timeout=30) as http:
            for device_id, dev in self.devices.items():
                self._tick_device(http, device_id, dev, now)

    def _tick_device(self, http: httpx.Client, device_id: str, dev: _Device, now: str) -> None:
        state = self._desired(http, dev)
        mine = [m for m in state.modules if m.service == self._service]
        modules = []
        if mine:
            wanted = mine[0].manifest_digest
            how = self.behaviour.get(wanted, Behaviour())
            if how.fails_to_start:
                modules.append(
                    {"service": self._service, "manifest_digest": wanted, "state": "Failed",
                     "reason": "score.py:3 RuntimeError: init failed", "since": now,
                     "generation": state.generation, "serving_digest": dev.digest}
                )  # fmt: skip
            else:
                if wanted != dev.digest:  # a new instance: its counters start again
                    dev.digest, dev.requests, dev.errors = wanted, 0, 0
                    dev.ever.add(wanted)
                dev.requests += 100
                dev.errors += round(100 * how.error_share)
                modules.append(
                    {"service": self._service, "manifest_digest": wanted, "state": "Healthy",
                     "since": now, "generation": state.generation, "serving_digest": wanted}
                )  # fmt: skip
        report = {
            "schema": "edgepack.reported/v1", "device_id": device_id, "reported_at": now,
            "agent_version": "0.1.0", "applied_generation": state.generation, "modules": modules,
        }  # fmt: skip
        base = f"{self._prefix}/devices/{device_id}"
        key = [(m["manifest_digest"], m["state"], m["generation"]) for m in modules]
        if key != dev.last_report:  # as an agent does: on a change
            self._probe.publish(f"{base}/reported", json.dumps(report).encode(), retain=True)
            dev.last_report = key
        if modules and modules[0]["state"] == "Healthy":
            how = self.behaviour.get(str(dev.digest), Behaviour())
            sample = {
                "device_id": device_id, "ts": now,
                "modules": [{"service": self._service, "requests_total": dev.requests,
                             "errors_total": dev.errors, "requests_per_s": 100.0, "p95_ms": how.p95_ms}],
            }  # fmt: skip
            self._probe.publish(f"{base}/telemetry", json.dumps(sample).encode(), qos=0)

    def start(self, interval_s: float = 0.5) -> None:
        def run() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.tick()
                except Exception:
                    continue

        self._thread = threading.Thread(target=run, name="sim-fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
