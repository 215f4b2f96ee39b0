"""Issue 8: what one enrolled (or compromised) device must not be able to do to the others,
to the hub or to its dashboard. Each test failed before the fix that came with it."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from cloud_hub.broker.mosquitto import BrokerUser, render_config, write_broker_files
from cloud_hub.broker.passwords import hash_password
from cloud_hub.events import Event
from cloud_hub.ingest.budget import IngestLimits
from cloud_hub.ingest.series import service_series
from cloud_hub.ingest.tables import DeviceReport, TelemetrySample
from cloud_hub.ingest.worker import IngestWorker
from manifests.reported import ModuleMetrics, Telemetry
from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker, BrokerFactory, MqttProbe, free_port, start_mosquitto
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import deploy, enroll, push


def test_a_device_cannot_knock_another_off_the_broker_with_its_client_id(
    tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    prefix = "ids"
    write_broker_files(
        tmp_path / "broker",
        prefix=prefix,
        hub=BrokerUser("edgepack-hub", hash_password("hub-pw")),
        devices=[BrokerUser("dev-a", hash_password("pw-a")), BrokerUser("dev-b", hash_password("pw-b"))],
    )
    broker = broker_factory(tmp_path / "broker")
    hub_side = broker.probe(username="edgepack-hub", password="hub-pw")
    victim = broker.probe(username="dev-a", password="pw-a", client_id="dev-a")
    # The attacker logs in with its own credentials but claims the victim's client id; MQTT
    # says the broker must then close the older session with that id.
    attacker = broker.probe(username="dev-b", password="pw-b", client_id="dev-a")
    try:
        assert hub_side.subscribe(f"{prefix}/devices/+/online") == [1]
        time.sleep(1.0)
        assert victim.disconnects == 0, "the victim's connection was closed"
        victim.publish(f"{prefix}/devices/dev-a/online", b"true")
        assert hub_side.expect(lambda m: m.topic.endswith("dev-a/online")).payload == b"true"
        # The attacker is connected as itself and nothing more.
        attacker.publish(f"{prefix}/devices/dev-b/online", b"true")
        assert hub_side.expect(lambda m: m.topic.endswith("dev-b/online")).payload == b"true"
    finally:
        attacker.close()
        victim.close()
        hub_side.close()


# --- telemetry and reported state from a hostile device ----------------------------------------


def _ingest(h: RunningHub) -> IngestWorker:
    worker = h.ctx.extras["ingest"]
    assert isinstance(worker, IngestWorker)
    return worker


def _settle(h: RunningHub, received: int) -> None:
    worker = _ingest(h)
    deadline = time.monotonic() + 20
    while worker.stats.received < received:
        assert time.monotonic() < deadline, f"{worker.stats.received}/{received} messages arrived"
        time.sleep(0.02)
    assert worker.drain(20)


def _sample(device_id: str, *modules: tuple[str, float]) -> bytes:
    return json.dumps(
        {
            "device_id": device_id,
            "ts": datetime.now(UTC).isoformat(),
            "modules": [
                {"service": svc, "requests_total": 1, "errors_total": 0, "requests_per_s": rps, "p50_ms": rps}
                for svc, rps in modules
            ],
        }
    ).encode()


def _fleet_of_two(h: RunningHub, publisher: Publisher) -> None:
    """dev-a runs 'mine', dev-b runs 'theirs'."""
    mod = push(h, publisher, "mod", "1")
    with h.client() as http:
        enroll(http, "dev-a")
        enroll(http, "dev-b")
        assert deploy(http, "mine", mod, devices=["dev-a"], port=8001).status_code == 201
        assert deploy(http, "theirs", mod, devices=["dev-b"], port=8002).status_code == 201


def test_huge_telemetry_numbers_do_not_take_the_charts_down(
    hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str
) -> None:
    # Two samples of 1.7e308 req/s in one bucket overflowed the sum: the telemetry endpoint
    # answered 500 and the dashboard showed nothing but "hub unreachable".
    h = hub(mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None)
    _fleet_of_two(h, publisher)
    device = mosquitto.probe()
    try:
        topic = f"{topic_prefix}/devices/dev-a/telemetry"
        device.publish(topic, _sample("dev-a", ("mine", 1.7e308)), qos=1)
        device.publish(topic, _sample("dev-a", ("mine", 1.7e308)), qos=1)
        device.publish(topic, _sample("dev-a", ("mine", 3.0)), qos=1)
        # ... and numbers for a service dev-a does not run land in nobody's chart.
        device.publish(topic, _sample("dev-a", ("theirs", 5000.0)), qos=1)
        _settle(h, 4)
    finally:
        device.close()
    with h.client() as http:
        r = http.get("/api/v1/dashboard/telemetry", params={"bucket_s": 3600})
    assert r.status_code == 200, r.text
    services = r.json()["services"]
    assert set(services) == {"mine"}, services
    assert [p["rps"] for p in services["mine"]] == [3.0]
    assert _ingest(h).stats.rejected == 2  # out of the contract's range
    assert _ingest(h).stats.unassigned == 1


def test_chart_series_stay_finite_whatever_the_stored_numbers() -> None:
    # Rows stored before the contract bounded them (or by another writer) are bounded again.
    now = datetime.now(UTC)
    huge = [
        Telemetry.model_construct(
            device_id=f"dev-{n}",
            ts=now,
            modules=[ModuleMetrics.model_construct(service="svc", requests_per_s=1.7e308, p50_ms=math.inf)],
        )
        for n in range(3)
    ]
    [point] = service_series(huge, bucket_s=60)["svc"]
    assert math.isfinite(point.requests_per_s) and point.p50_ms is not None and math.isfinite(point.p50_ms)


def test_a_device_flipping_many_modules_cannot_flood_the_event_log(
    hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str
) -> None:
    # Reports with many modules flipping between states used to add ~2,700 events/s, and a
    # report about a service the device is not assigned made events for that service.
    h = hub(mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None)
    _fleet_of_two(h, publisher)
    start = datetime.now(UTC)
    rounds, fakes = 300, 40
    device = mosquitto.probe()
    try:
        for n in range(rounds):
            state = "Healthy" if n % 2 else "Unhealthy"
            modules = [
                {"service": svc, "state": state, "since": start.isoformat(), "reason": "flip"}
                for svc in ["mine", "theirs", *(f"fake-{i}" for i in range(fakes))]
            ]
            report = {
                "device_id": "dev-a",
                "reported_at": (start + timedelta(milliseconds=n)).isoformat(),
                "agent_version": "evil",
                "applied_generation": 1,
                "modules": modules,
            }
            device.publish(f"{topic_prefix}/devices/dev-a/reported", json.dumps(report), qos=1)
        _settle(h, rounds)
    finally:
        device.close()
    worker = _ingest(h)
    with h.ctx.sessions.begin() as s:
        kinds = s.execute(
            select(Event.service, func.count()).where(Event.device_id == "dev-a").group_by(Event.service)
        ).all()
        by_service = dict(kinds)
        throttled = s.scalars(select(Event.message).where(Event.kind == "throttled")).all()
    assert set(by_service) <= {"mine", None}, by_service  # nothing for 'theirs' or 'fake-*'
    assert sum(by_service.values()) < 250, by_service  # the budget, not 300 x 42 events
    assert worker.stats.unassigned > 0
    assert len(throttled) <= 1
    # The device's last accepted report is still what the hub shows.
    with h.client() as http:
        modules = http.get("/api/v1/devices/dev-a").json()["modules"]
    assert [m["service"] for m in modules] == ["mine"]


def test_the_event_log_is_trimmed_to_its_configured_size(
    hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str
) -> None:
    h = hub(
        mqtt_host=mosquitto.host,
        mqtt_port=mosquitto.port,
        topic_prefix=topic_prefix,
        mqtt_username=None,
        events_keep=100,
    )
    with h.client() as http:
        for n in range(150):
            enroll(http, f"dev-{n}")
    with h.ctx.sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(Event)) >= 150
    device = mosquitto.probe()
    try:
        device.publish(f"{topic_prefix}/devices/dev-0/online", b"true")
        _settle(h, 1)
    finally:
        device.close()
    with h.ctx.sessions.begin() as s:
        assert s.scalar(select(func.count()).select_from(Event)) == 100
        newest = s.scalars(select(Event.message).order_by(Event.id.desc()).limit(1)).one()
    assert "dev-0 came online" in newest


def test_a_device_over_its_budget_is_throttled_and_its_newest_state_still_lands(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub()
    _fleet_of_two(h, publisher)
    worker = IngestWorker(
        h.ctx.sessions,
        prefix="p",
        telemetry_keep=100,
        limits=IngestLimits(reports_per_min=120, reports_burst=5, telemetry_per_min=1, telemetry_burst=3),
    )
    worker.start()
    start = datetime.now(UTC) - timedelta(minutes=1)
    try:
        for n in range(20):
            report = {
                "device_id": "dev-a",
                "reported_at": (start + timedelta(seconds=n)).isoformat(),
                "agent_version": "chatty",
                "applied_generation": 1,
                "modules": [{"service": "mine", "state": "Healthy", "since": start.isoformat()}],
            }
            worker.submit("p/devices/dev-a/reported", json.dumps(report).encode(), False)
            worker.submit("p/devices/dev-a/telemetry", _sample("dev-a", ("mine", 1.0)), False)
            # Applied one by one (nothing folded into a newer pending state) while the burst
            # lasts; then the reports come faster than the budget refills.
            if n < 5:
                assert worker.drain(10)
            else:
                time.sleep(0.01)
        assert worker.drain(10)
        assert worker.stats.throttled >= 14 + 16
        assert worker.stats.applied <= 5 + 3 + 3  # the bursts, and what refilled meanwhile
    finally:
        worker.stop()
    with h.ctx.sessions.begin() as s:
        report_row = s.get(DeviceReport, "dev-a")
        assert report_row is not None and report_row.reported_at == start + timedelta(seconds=19)
        assert s.scalar(select(func.count()).select_from(TelemetrySample)) <= 4
        throttled = s.scalars(select(Event.message).where(Event.kind == "throttled")).all()
    assert len(throttled) == 1 and "dev-a" in throttled[0], throttled


def test_hub_replicas_on_the_hub_listener_share_one_user_without_replacing_each_other(
    tmp_path: Path
) -> None:
    prefix = "rep"
    broker_dir = tmp_path / "broker"
    write_broker_files(
        broker_dir,
        prefix=prefix,
        hub=BrokerUser("edgepack-hub", hash_password("hub-pw")),
        devices=[BrokerUser("dev-a", hash_password("pw-a")), BrokerUser("dev-b", hash_password("pw-b"))],
    )
    hub_port = free_port()
    run_as = "root" if os.geteuid() == 0 else None
    broker = start_mosquitto(
        tmp_path / "run",
        lambda port: render_config(broker_dir, port=port, run_as=run_as, hub_port=hub_port),
    )
    try:
        replicas = [
            MqttProbe.connect("127.0.0.1", hub_port, username="edgepack-hub", password="hub-pw")
            for _ in range(2)
        ]
        victim = broker.probe(username="dev-a", password="pw-a", client_id="dev-a")
        attacker = broker.probe(username="dev-b", password="pw-b", client_id="dev-a")
        time.sleep(1.0)
        assert [r.disconnects for r in replicas] == [0, 0]
        assert victim.disconnects == 0  # the devices' listener still binds ids to users
        for client in (*replicas, victim, attacker):
            client.close()
    finally:
        broker.stop()
