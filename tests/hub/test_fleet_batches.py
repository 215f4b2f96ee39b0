"""A fleet at once: many devices' reports in one ingest batch, many states in one publish.

Against a real hub database (SQLite, or PostgreSQL in the PostgreSQL pass) and a real
Mosquitto: batching must not change what is stored, which events are recorded, or what a
device finds retained on its topic.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import event as sa_event
from sqlalchemy import func, select

from cloud_hub.broker.passwords import hash_password
from cloud_hub.events import Event
from cloud_hub.fleet.publish import DesiredPublisher, unpublished
from cloud_hub.fleet.tables import Device, DeviceDesired
from cloud_hub.ingest.messages import Reported, TelemetryMessage, parse_message
from cloud_hub.ingest.state import BatchView, apply_reported, apply_telemetry
from cloud_hub.ingest.tables import DeviceReport, ModuleState, TelemetrySample
from cloud_hub.ingest.worker import IngestWorker
from cloud_hub.mqtt.link import MqttLink
from cloud_hub.webhooks.tables import Delivery, Subscription
from manifests.desired import DeploymentSettings, DesiredState, ModuleAssignment
from manifests.signing import envelope_bytes, sign_payload
from tests.hub.broker_fixtures import MqttProbe, plain_config, start_mosquitto
from tests.hub.conftest import HubFactory, RunningHub

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DIGEST = "sha256:" + "c" * 64
PREFIX = "batches"


def _fleet(h: RunningHub, n: int) -> list[str]:
    """``n`` enrolled devices, each assigned service ``svc`` by a signed desired state."""
    ids = [f"dev-{i:04d}" for i in range(n)]
    pw = hash_password("x")
    with h.core.sessions.begin() as s:
        s.add_all(Device(id=d, tags={}, mqtt_password_hash=pw, token_hash=f"t-{d}") for d in ids)
        s.flush()
        for d in ids:
            state = DesiredState(
                device_id=d, generation=1, issued=T0, expires=T0 + timedelta(days=3650),
                modules=[ModuleAssignment(service="svc", module="svc", version="1", manifest_digest=DIGEST,
                                          settings=DeploymentSettings(port=80))],
            )  # fmt: skip
            payload = envelope_bytes(
                sign_payload(state.model_dump(mode="json", by_alias=True), [h.core.hub_key])
            )
            s.add(DeviceDesired(device_id=d, generation=1, payload=payload))
    return ids


def _report(device_id: str, seconds: int, state: str, version: str = "1") -> bytes:
    at = (T0 + timedelta(seconds=seconds)).isoformat()
    module = {"service": "svc", "manifest_digest": DIGEST, "version": version, "state": state, "since": at}
    return json.dumps(
        {"device_id": device_id, "reported_at": at, "agent_version": "t", "applied_generation": 1,
         "modules": [module]}
    ).encode()  # fmt: skip


def test_a_fleet_reporting_at_once_is_applied_in_batches_with_one_event_per_change(hub: HubFactory) -> None:
    h = hub()
    ids = _fleet(h, 1200)
    worker = IngestWorker(h.core.sessions, prefix=PREFIX, telemetry_keep=10, batch_size=500)
    topic = f"{PREFIX}/devices/{{}}/reported"
    # Every device: Transitioning, then (a later report) Healthy; the odd ones also an older,
    # late report that must not win. Retained redeliveries of the last state change nothing.
    for d in ids:
        worker.submit(topic.format(d), _report(d, 1, "Transitioning"), False)
    worker.start()
    try:
        assert worker.drain(timeout=60)
        for i, d in enumerate(ids):
            worker.submit(topic.format(d), _report(d, 2, "Healthy"), False)
            if i % 2:
                worker.submit(topic.format(d), _report(d, 0, "Failed"), False)  # older: not news
        assert worker.drain(timeout=60)
        for d in ids:
            worker.submit(topic.format(d), _report(d, 2, "Healthy"), True)
        assert worker.drain(timeout=60)
    finally:
        worker.stop()
    assert worker.stats.failed == 0 and worker.stats.unknown_device == 0
    with h.core.sessions.begin() as s:
        states = dict(s.execute(select(ModuleState.device_id, ModuleState.state)).all())
        assert states == dict.fromkeys(ids, "Healthy")
        reported = {r.device_id: r.reported_at for r in s.scalars(select(DeviceReport))}
        assert reported == dict.fromkeys(ids, T0 + timedelta(seconds=2))
        kinds = dict(s.execute(select(Event.kind, func.count()).group_by(Event.kind)).all())
        # deployed (first report), healthy (second); nothing for the stale or repeated ones
        assert kinds == {"deployed": len(ids), "healthy": len(ids)}
        assert s.scalar(select(func.count()).select_from(Device).where(Device.last_seen.is_(None))) == 0


def test_a_deploy_publishes_every_state_in_batches_and_marks_only_what_the_broker_took(
    hub: HubFactory, tmp_path: Path
) -> None:
    broker = start_mosquitto(tmp_path / "mosquitto", plain_config)  # our own: it is stopped below
    h = hub()
    ids = _fleet(h, 700)  # several publish chunks
    link = MqttLink(host=broker.host, port=broker.port, prefix=PREFIX)
    link.start()
    assert link.wait_connected(10)
    publisher = DesiredPublisher(h.core.sessions, link)
    try:
        assert publisher.publish_pending() == []
    finally:
        link.stop()
    with h.core.sessions.begin() as s:
        assert unpublished(s) == []
    probe = MqttProbe.connect(broker.host, broker.port)
    try:
        probe.subscribe(f"{PREFIX}/devices/+/desired")
        got = {m.topic.split("/")[2]: m for m in probe.received_within(lambda m: m.retain, 3.0)}
    finally:
        probe.close()
    assert sorted(got) == ids
    assert all(json.loads(m.payload)["signed"]["device_id"] == d for d, m in got.items())

    # With the broker gone nothing is acknowledged: every row stays unpublished, for upkeep.
    with h.core.sessions.begin() as s:
        for row in s.scalars(select(DeviceDesired)):
            row.generation += 1
    broker.stop()
    link = MqttLink(host=broker.host, port=broker.port, prefix=PREFIX, connect_wait_s=0.5)
    link.start()
    try:
        errors = DesiredPublisher(h.core.sessions, link).publish_pending()
    finally:
        link.stop()
        broker.stop()
    assert len(errors) == len(ids) and "not connected" in errors[0]
    with h.core.sessions.begin() as s:
        assert unpublished(s) == ids


def test_two_reports_of_a_new_device_in_one_batch_keep_the_newer(hub: HubFactory) -> None:
    # The worker keeps one pending state per device, but a batch must stay right without that.
    h = hub()
    (device,) = _fleet(h, 1)
    received = T0 + timedelta(hours=1)
    messages = [
        parse_message(f"{PREFIX}/devices/{device}/reported", _report(device, s, state), prefix=PREFIX,
                      retained=False, received_at=received)
        for s, state in ((1, "Transitioning"), (2, "Healthy"), (0, "Failed"))
    ]  # fmt: skip
    with h.core.sessions.begin() as s:
        view = BatchView(s, [device])
        applied = [apply_reported(view, m) for m in messages if isinstance(m, Reported)]
        view.write()
    assert applied == [True, True, False]
    with h.core.sessions.begin() as s:
        report = s.get(DeviceReport, device)
        assert report is not None and report.reported_at == T0 + timedelta(seconds=2)
        assert s.get(ModuleState, (device, "svc")).state == "Healthy"  # type: ignore[union-attr]
        kinds = sorted(s.scalars(select(Event.kind).where(Event.device_id == device)))
        assert kinds == ["deployed", "healthy"]


def _subscribe_all(h: RunningHub) -> None:
    """A webhook subscription that wants every event (its deliveries are what we count)."""
    with h.core.sessions.begin() as s:
        s.add(Subscription(id="sub-all", url="http://127.0.0.1:9/hook", secret="whsec_" + "a" * 32))


def _statements(h: RunningHub, into: list[str]) -> Callable[[], None]:
    """Record every SQL statement the hub's engine sends; returns how to stop recording."""
    engine = h.core.sessions.engine

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        into.append(statement)

    sa_event.listen(engine, "before_cursor_execute", seen)
    return lambda: sa_event.remove(engine, "before_cursor_execute", seen)


def test_a_batch_stores_its_events_in_one_statement_with_their_webhook_deliveries(hub: HubFactory) -> None:
    h = hub()
    ids = _fleet(h, 300)
    _subscribe_all(h)
    worker = IngestWorker(h.core.sessions, prefix=PREFIX, telemetry_keep=10, batch_size=500)
    built: list[Event] = []

    def constructed(target: Event, *_: Any) -> None:
        built.append(target)

    statements: list[str] = []
    stop = _statements(h, statements)
    sa_event.listen(Event, "init", constructed)
    try:
        # All 300 reports are pending before the worker starts: one batch.
        for d in ids:
            worker.submit(f"{PREFIX}/devices/{d}/reported", _report(d, 1, "Healthy"), False)
        worker.start()
        assert worker.drain(timeout=60)
    finally:
        worker.stop()
        sa_event.remove(Event, "init", constructed)
        stop()
    # The devices' events (deployed and healthy, 600) are rows of one INSERT, not ORM objects;
    # only the service's roll-up event, if any, still goes through the ORM.
    assert [e.kind for e in built if not e.kind.startswith("service_")] == []
    assert sum(1 for st in statements if st.lstrip().upper().startswith("INSERT INTO EVENTS")) == 1
    with h.core.sessions.begin() as s:
        events = dict(s.execute(select(Event.id, Event.kind).where(Event.device_id.is_not(None))).all())
        assert sorted(Counter(events.values()).items()) == [("deployed", 300), ("healthy", 300)]
        delivered = list(s.execute(select(Delivery.event_id, Delivery.subject)))
    # Each event once, delivered once, about its own device and service.
    assert sorted(event_id for event_id, _ in delivered if event_id in events) == sorted(events)
    assert {subject for _, subject in delivered} >= {f"services/svc/devices/{d}" for d in ids}


def test_two_workers_applying_the_same_reports_at_once_record_each_event_once(
    hub: HubFactory, postgres: str
) -> None:
    # Two replicas that both get every message (a broker without shared subscriptions, or QoS 1
    # redelivery): the device rows each batch locks first make the second see nothing new.
    h = hub(postgres=postgres)
    ids = _fleet(h, 400)
    _subscribe_all(h)
    workers = [
        IngestWorker(h.core.sessions, prefix=PREFIX, telemetry_keep=10, batch_size=100) for _ in range(2)
    ]
    for w in workers:
        for d in ids:
            w.submit(f"{PREFIX}/devices/{d}/reported", _report(d, 1, "Failed"), False)
    _apply_at_once(workers)
    with h.core.sessions.begin() as s:
        kinds = Counter(s.scalars(select(Event.kind).where(Event.device_id.is_not(None))))
        assert kinds == {"deployed": len(ids), "failed": len(ids)}
        per_event = Counter(s.scalars(select(Delivery.event_id)))
        assert set(per_event.values()) == {1}
        assert s.scalar(select(func.count()).select_from(ModuleState)) == len(ids)


def _sample(device_id: str, seconds: int, *services: str) -> bytes:
    at = (T0 + timedelta(seconds=seconds)).isoformat()
    modules = [
        {"service": svc, "requests_total": seconds, "errors_total": 0, "requests_per_s": 1.0}
        for svc in services
    ]
    return json.dumps({"device_id": device_id, "ts": at, "modules": modules}).encode()


def _telemetry_batch(
    h: RunningHub, samples: list[tuple[str, int]], *, keep: int, received: datetime = T0 + timedelta(hours=1)
) -> tuple[int, int, list[str]]:
    """Apply ``(device, seconds)`` samples as one ingest batch, as the worker does; returns the
    samples from enrolled devices, the unassigned modules dropped and the statements sent."""
    messages = [
        parse_message(f"{PREFIX}/devices/{d}/telemetry", _sample(d, sec, "svc", "stranger"), prefix=PREFIX,
                      retained=False, received_at=received)
        for d, sec in samples
    ]  # fmt: skip
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    assert all(isinstance(m, TelemetryMessage) for m in messages)
    with h.core.sessions.begin() as s:
        # This session's connection only: the hub's own loops share the engine.
        conn = s.connection()
        sa_event.listen(conn, "before_cursor_execute", seen)
        view = BatchView(s, [d for d, _ in samples])
        known = apply_telemetry(view, cast(list[TelemetryMessage], messages), keep=keep)
        view.write()
        sa_event.remove(conn, "before_cursor_execute", seen)
    return known, view.unassigned, statements


def _held(h: RunningHub) -> dict[str, list[int]]:
    """Each device's stored samples, as their seconds after T0, oldest first."""
    with h.core.sessions.begin() as s:
        rows = s.execute(select(TelemetrySample.device_id, TelemetrySample.ts).order_by(TelemetrySample.id))
        out: dict[str, list[int]] = {}
        for device_id, ts in rows:
            out.setdefault(device_id, []).append(int((ts.replace(tzinfo=UTC) - T0).total_seconds()))
        return out


def test_telemetry_keeps_the_newest_samples_of_each_device_across_batches(hub: HubFactory) -> None:
    h = hub()
    a, b, c = _fleet(h, 3)
    first = [(a, n) for n in range(5)] + [(b, n) for n in range(2)] + [(c, n) for n in range(4)]
    first += [("ghost", 1), (a, 4)]  # not enrolled; a sample sent twice in one batch
    known, unassigned, _ = _telemetry_batch(h, first, keep=3)
    assert (known, unassigned) == (12, 11)  # the ghost skipped; each stored sample's "stranger"
    assert _held(h) == {a: [2, 3, 4], b: [0, 1], c: [1, 2, 3]}
    _telemetry_batch(h, [(b, 5), (a, 7), (b, 6), (a, 8), (b, 7)], keep=3)
    assert _held(h) == {a: [4, 7, 8], b: [5, 6, 7], c: [1, 2, 3]}
    with h.core.sessions.begin() as s:
        payloads = s.scalars(select(TelemetrySample.payload))
        assert {m["service"] for p in payloads for m in p["modules"]} == {"svc"}
        seen = {d: at for d, at in s.execute(select(Device.id, Device.last_seen))}
    assert seen[a] is not None and seen[b] is not None


def test_a_telemetry_batch_sends_as_many_statements_for_fifty_devices_as_for_five(hub: HubFactory) -> None:
    h = hub()
    ids = _fleet(h, 50)
    # Two samples per device, a history already over ``keep``: every device is trimmed.
    for batch in range(2):
        _telemetry_batch(h, [(d, 2 * batch + n) for d in ids for n in range(2)], keep=3)
    counts = [
        len(_telemetry_batch(h, [(d, 10 + n) for d in ids[:size] for n in range(2)], keep=3)[2])
        for size in (5, 50)
    ]
    # The devices' rows, desired states, reports, module states, held samples; INSERT, trim;
    # the devices' last-seen UPDATE. (A statement per device was ~3 per sample.)
    assert counts[0] == counts[1] <= 9, counts
    assert _held(h) == {d: [3, 10, 11] for d in ids}


def test_two_workers_given_the_same_telemetry_store_each_sample_once(hub: HubFactory, postgres: str) -> None:
    # Two replicas that both get every sample (a broker without shared subscriptions, or QoS 1
    # redelivery): the second finds the first's samples under the device rows' locks.
    h = hub(postgres=postgres)
    ids = _fleet(h, 200)
    workers = [
        IngestWorker(h.core.sessions, prefix=PREFIX, telemetry_keep=10, batch_size=50) for _ in range(2)
    ]
    for w in workers:
        for n in range(2):
            for d in ids:
                w.submit(f"{PREFIX}/devices/{d}/telemetry", _sample(d, n, "svc"), False)
    _apply_at_once(workers)
    assert _held(h) == {d: [0, 1] for d in ids}


def _apply_at_once(workers: list[IngestWorker]) -> None:
    """Start the workers together, let each apply everything it was given, stop them."""
    for w in workers:
        w.start()
    try:
        assert all(w.drain(timeout=120) for w in workers)
    finally:
        for w in workers:
            w.stop()
    assert [w.stats.failed for w in workers] == [0] * len(workers)
