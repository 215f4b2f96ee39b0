"""Ingest against a real Mosquitto: devices publish, the hub stores state, history and events."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from cloud_hub.broker.passwords import hash_password
from cloud_hub.core import HubCore
from cloud_hub.events import Event
from cloud_hub.fleet.tables import Device, DeviceDesired
from cloud_hub.ingest.state import device_module_statuses, service_statuses
from cloud_hub.ingest.tables import DeviceReport, TelemetrySample
from cloud_hub.ingest.worker import IngestWorker
from cloud_hub.settings import HubSettings
from cloud_hub.wiring import HubProcess, open_hub
from manifests.desired import DeploymentSettings, DesiredState, ModuleAssignment
from manifests.signing import envelope_bytes, sign_payload
from manifests.states import ServiceState
from tests.hub.broker_fixtures import Broker, MqttProbe

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "a" * 64


def reported(device_id: str, seconds: int, *modules: tuple[str, str, str | None]) -> bytes:
    return json.dumps(
        {
            "schema": "edgepack.reported/v1",
            "device_id": device_id,
            "reported_at": (T0 + timedelta(seconds=seconds)).isoformat(),
            "agent_version": "0.1.0",
            "applied_generation": 1,
            "modules": [
                {
                    "service": svc,
                    "manifest_digest": DIGEST,
                    "state": state,
                    "reason": reason,
                    "since": T0.isoformat(),
                }
                for svc, state, reason in modules
            ],
        }
    ).encode()


def telemetry(device_id: str, n: int) -> bytes:
    return json.dumps(
        {
            "device_id": device_id,
            "ts": (T0 + timedelta(seconds=n)).isoformat(),
            "modules": [
                {
                    "service": "digits",
                    "requests_total": n,
                    "errors_total": 0,
                    "requests_per_s": 2.0,
                    "p50_ms": 3.5,
                }
            ],
        }
    ).encode()


class Hub:
    def __init__(self, data_dir: Path, broker: Broker, prefix: str) -> None:
        settings = HubSettings(
            data_dir=data_dir,
            mqtt_host=broker.host,
            mqtt_port=broker.port,
            topic_prefix=prefix,
            mqtt_username=None,
            telemetry_keep=3,
        )
        self.process: HubProcess = open_hub(settings)
        self.core: HubCore = self.process.core
        self.process.start()
        assert self.process.ingest is not None
        self.worker: IngestWorker = self.process.ingest

    def settle(self, received: int) -> None:
        """Wait until ``received`` messages arrived and everything was applied."""
        deadline = time.monotonic() + 20
        while self.worker.stats.received < received:
            assert time.monotonic() < deadline, f"only {self.worker.stats.received}/{received} arrived"
            time.sleep(0.02)
        assert self.worker.drain(20)

    def events(self, device_id: str) -> list[tuple[str, str]]:
        with self.core.sessions.begin() as s:
            rows = s.scalars(select(Event).where(Event.device_id == device_id).order_by(Event.id))
            return [(e.kind, e.message) for e in rows]

    def device(self, device_id: str) -> Any:
        with self.core.sessions.begin() as s:
            return s.get(Device, device_id)


def enroll(core: HubCore, *device_ids: str, services: tuple[str, ...] = ("digits",)) -> None:
    """Devices as enrolment leaves them, with a signed desired state that assigns ``services``
    (ingest drops reports about services a device was not given)."""
    with core.sessions.begin() as s:
        for d in device_ids:
            s.add(Device(id=d, tags={}, mqtt_password_hash=hash_password("x"), token_hash=f"tok-{d}"))
        s.flush()
        for d in device_ids:
            state = DesiredState(
                device_id=d,
                generation=1,
                issued=T0,
                expires=T0 + timedelta(days=3650),
                modules=[
                    ModuleAssignment(
                        service=svc,
                        module=svc,
                        version="1",
                        manifest_digest=DIGEST,
                        settings=DeploymentSettings(port=8000 + n),
                    )
                    for n, svc in enumerate(services)
                ],
            )
            envelope = sign_payload(state.model_dump(mode="json", by_alias=True), [core.hub_key])
            s.add(DeviceDesired(device_id=d, generation=1, payload=envelope_bytes(envelope)))


@pytest.fixture
def hub(tmp_path: Path, mosquitto: Broker, topic_prefix: str) -> Iterator[Hub]:
    h = Hub(tmp_path / "hub", mosquitto, topic_prefix)
    enroll(h.core, "dev-1", "dev-2")
    yield h
    h.process.close()


@pytest.fixture
def device(mosquitto: Broker) -> Iterator[MqttProbe]:
    probe = mosquitto.probe()
    yield probe
    probe.close()


def test_device_states_history_and_events(hub: Hub, device: MqttProbe, topic_prefix: str) -> None:
    t = f"{topic_prefix}/devices"
    device.publish(f"{t}/dev-1/online", b"true", retain=True)
    device.publish(
        f"{t}/dev-1/reported", reported("dev-1", 1, ("digits", "Transitioning", None)), retain=True
    )
    for n in range(5):
        device.publish(f"{t}/dev-1/telemetry", telemetry("dev-1", n), qos=0)
    hub.settle(7)
    device.publish(f"{t}/dev-1/reported", reported("dev-1", 2, ("digits", "Healthy", None)), retain=True)
    hub.settle(8)

    dev = hub.device("dev-1")
    assert (dev.online, dev.agent_version) == (True, "0.1.0")
    assert dev.last_seen is not None
    with hub.core.sessions.begin() as s:
        [status] = device_module_statuses(s, "dev-1")
        assert (status.service, status.state, status.manifest_digest) == (
            "digits",
            ServiceState.HEALTHY,
            DIGEST,
        )
        assert set(service_statuses(s, "digits")) == {"dev-1"}
        samples = s.scalars(select(TelemetrySample).order_by(TelemetrySample.id)).all()
        # Only the newest telemetry_keep=3 samples survive.
        assert [x.payload["modules"][0]["requests_total"] for x in samples] == [2, 3, 4]
    assert [k for k, _ in hub.events("dev-1")] == ["online", "deployed", "healthy"]

    device.publish(f"{t}/dev-1/online", b"false", retain=True)
    hub.settle(9)
    assert hub.device("dev-1").online is False
    assert hub.events("dev-1")[-1] == ("offline", "dev-1 went offline")


def test_failure_reason_and_removed_module_become_events(
    hub: Hub, device: MqttProbe, topic_prefix: str
) -> None:
    t = f"{topic_prefix}/devices/dev-2/reported"
    device.publish(t, reported("dev-2", 1, ("digits", "Transitioning", None)))
    device.publish(t, reported("dev-2", 2, ("digits", "Failed", "init() raised: model missing")))
    hub.settle(2)
    # Coalescing may fold the two reports into one; either way the failure is told with its reason.
    assert hub.events("dev-2")[-1] == ("failed", "digits failed on dev-2: init() raised: model missing")
    device.publish(t, reported("dev-2", 3))
    hub.settle(3)
    assert hub.events("dev-2")[-1] == ("removed", "digits removed from dev-2")
    with hub.core.sessions.begin() as s:
        assert device_module_statuses(s, "dev-2") == []


def test_bad_messages_are_dropped_without_stalling_others(
    hub: Hub, device: MqttProbe, topic_prefix: str
) -> None:
    t = f"{topic_prefix}/devices"
    device.publish(f"{t}/dev-2/reported", b"{broken json")
    device.publish(f"{t}/dev-2/telemetry", b"x" * 300_000, qos=0)
    device.publish(f"{t}/dev-1/reported", reported("dev-2", 1, ("digits", "Healthy", None)))  # spoofed
    device.publish(f"{t}/ghost/reported", reported("ghost", 1, ("digits", "Healthy", None)))  # not enrolled
    hub.settle(4)  # before dev-1's own report, which would replace the pending spoofed one
    device.publish(f"{t}/dev-1/reported", reported("dev-1", 1, ("digits", "Healthy", None)))
    hub.settle(5)

    with hub.core.sessions.begin() as s:
        assert [x.state for x in device_module_statuses(s, "dev-1")] == [ServiceState.HEALTHY]
        assert device_module_statuses(s, "dev-2") == []
        assert s.get(DeviceReport, "ghost") is None
    rejected = [m for k, m in hub.events("dev-2") if k == "rejected"]
    assert len(rejected) == 1  # rate-limited per device
    assert "invalid reported message" in rejected[0]
    assert any("names device 'dev-2'" in m for k, m in hub.events("dev-1") if k == "rejected")
    assert hub.worker.stats.unknown_device == 1


def test_redelivered_retained_state_is_not_news(
    tmp_path: Path, mosquitto: Broker, device: MqttProbe, topic_prefix: str
) -> None:
    first = Hub(tmp_path / "hub", mosquitto, topic_prefix)
    enroll(first.core, "dev-1")
    t = f"{topic_prefix}/devices/dev-1"
    device.publish(f"{t}/online", b"true", retain=True)
    device.publish(f"{t}/reported", reported("dev-1", 1, ("digits", "Healthy", None)), retain=True)
    first.settle(2)
    before = first.events("dev-1")
    seen = first.device("dev-1").last_seen
    first.process.close()

    # A restarted hub gets both retained messages again; they change nothing.
    again = Hub(tmp_path / "hub", mosquitto, topic_prefix)
    try:
        again.settle(2)
        assert again.events("dev-1") == before
        assert again.device("dev-1").last_seen == seen
        with again.core.sessions.begin() as s:
            assert s.scalar(select(func.count()).select_from(DeviceReport)) == 1
    finally:
        again.process.close()


def test_a_stalled_database_does_not_stall_the_broker_session(
    hub: Hub, device: MqttProbe, topic_prefix: str
) -> None:
    t = f"{topic_prefix}/devices"
    device.publish(f"{t}/dev-1/reported", reported("dev-1", 0, ("digits", "Transitioning", None)))
    hub.settle(1)
    # Another writer holds SQLite's write lock: the worker blocks in its transaction.
    blocker = sqlite3.connect(hub.core.settings.data_dir / "hub.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for n in range(1, 101):
            device.publish(f"{t}/dev-1/reported", reported("dev-1", n, ("digits", "Healthy", None)))
            device.publish(f"{t}/dev-2/reported", reported("dev-2", n, ("digits", "Healthy", None)))
        # The MQTT session is still live: the hub publishes, and the broker acknowledges.
        device.subscribe(f"{t}/dev-1/desired")
        assert hub.process.link is not None
        hub.process.link.publish_desired("dev-1", b"while the database is busy")
        # (On a slow machine upkeep may have published the fixture's retained state first.)
        busy = b"while the database is busy"
        device.expect(lambda m: m.topic.endswith("/desired") and m.payload == busy)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    hub.settle(201)
    with hub.core.sessions.begin() as s:
        for dev in ("dev-1", "dev-2"):
            report = s.get(DeviceReport, dev)
            assert report is not None and report.reported_at == T0 + timedelta(seconds=100)
    # Pending states of one device were folded into the newest one while the database was busy.
    assert hub.worker.stats.coalesced > 0
    assert hub.worker.stats.failed == 0
