"""How many reported-state messages per second the hub's ingest keeps up with.

Runs the real pieces: a Mosquitto on a free loopback port, a hub context on a fresh SQLite
file, the hub's MQTT link and ingest worker, and paho clients acting as devices.

Two measurements:

- ``reported_msgs_per_s``: every message is applied on its own. Each round, every device
  publishes one reported state whose module state changed (so each message is a row update
  plus an event); a round ends when ingest has applied all of them. Since no device has two
  messages pending at once, nothing can be coalesced: this is the raw apply rate.
- ``telemetry_msgs_per_s``: the same rounds with one telemetry sample per device instead (a
  row inserted per sample, the device's history, already ``telemetry_keep`` samples long,
  trimmed back to it, its last-seen time updated), what a fleet sends every
  ``telemetry_interval_s`` (10 s by default).
- ``burst_msgs_per_s``: many messages from fewer devices as fast as the publishers go; ingest
  keeps only the newest pending state per device (latest wins), so it absorbs bursts far above
  its apply rate. ``coalesced`` says how many it folded.

And, with ``--replicas 1,2``, the scaled-out case: real ``edgepack hub serve`` processes on one
PostgreSQL and one Mosquitto (``bench/layout.py``), the replicas sharing the device messages
through a shared subscription. ``replicated`` gives the apply rate (every message a state
change, as above) for each replica count, the ratio of the largest to one (target: two
replicas at least 1.6 times one), and the check that no message was applied twice: the replicas together
received each message once, and each produced exactly one event.

Usage: ``python bench/ingest.py [--quick] [--devices 10000] [--replicas 1,2]``; the last line of
output is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, insert, select

# The benchmarks start the same engines as the tests, with the tests' helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud_hub.broker.passwords import hash_password
from cloud_hub.core import HubCore
from cloud_hub.fleet.tables import Deployment, Device, DeviceDesired
from cloud_hub.ingest.tables import TelemetrySample
from cloud_hub.ingest.worker import IngestWorker
from cloud_hub.settings import HubSettings
from cloud_hub.wiring import open_hub
from manifests.desired import DeploymentSettings, DesiredState, ModuleAssignment
from manifests.signing import envelope_bytes, sign_payload

PREFIX = "bench"
STATES = ("Transitioning", "Healthy", "Unhealthy", "Healthy")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DIGEST = "sha256:" + "b" * 64


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "mosquitto.conf"
    run_as = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_queued_messages 0\nmax_inflight_messages 0\n{run_as}"
    )
    proc = subprocess.Popen(
        ["/usr/sbin/mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("mosquitto did not start")


def publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def assigning_svc(core: HubCore, device_id: str) -> bytes:
    state = DesiredState(
        device_id=device_id,
        generation=1,
        issued=T0,
        expires=T0 + timedelta(days=3650),
        modules=[
            ModuleAssignment(
                service="svc",
                module="svc",
                version="1",
                manifest_digest=DIGEST,
                settings=DeploymentSettings(port=80),
            )
        ],
    )
    return envelope_bytes(sign_payload(state.model_dump(mode="json", by_alias=True), [core.hub_key]))


def reported(device_id: str, seq: int) -> bytes:
    at = (T0 + timedelta(seconds=seq)).isoformat()
    return json.dumps(
        {
            "device_id": device_id,
            "reported_at": at,
            "agent_version": "bench",
            "applied_generation": 1,
            "modules": [
                {"service": "svc", "manifest_digest": DIGEST, "state": STATES[seq % len(STATES)], "since": at}
            ],
        }
    ).encode()


def telemetry(device_id: str, seq: int) -> bytes:
    """One sample as the agent sends it, with one serving module."""
    module = {
        "service": "svc", "requests_total": 100 + seq, "errors_total": 0, "requests_per_s": 2.5,
        "p50_ms": 3.1, "p95_ms": 7.9, "p99_ms": 12.0, "cpu_percent": 4.0, "memory_mb": 60.0,
    }  # fmt: skip
    sample = {
        "device_id": device_id, "ts": (T0 + timedelta(seconds=seq)).isoformat(), "cpu_percent": 12.5,
        "memory_mb": 310.0, "agent_memory_mb": 38.0, "modules": [module],
    }  # fmt: skip
    return json.dumps(sample).encode()


def publish_all(pubs: list[mqtt.Client], payloads: list[tuple[str, bytes]]) -> None:
    """Publish every (topic, payload) at QoS 1, alternating publishers, and wait for the acks."""
    infos = [pubs[i % len(pubs)].publish(t, p, qos=1) for i, (t, p) in enumerate(payloads)]
    for info in infos:
        info.wait_for_publish(60)


def wait_received(worker: IngestWorker, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while worker.stats.received < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {worker.stats.received}/{count} messages reached the hub")
        time.sleep(0.005)
    if not worker.drain(timeout):
        raise SystemExit("ingest did not drain")


def run(
    devices: int, rounds: int, burst_devices: int, burst_per_device: int, db: str | None = None
) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="edgepack-bench-"))
    proc, port = start_broker(workdir)
    settings = HubSettings(
        data_dir=workdir / "hub",
        mqtt_host="127.0.0.1",
        mqtt_port=port,
        topic_prefix=PREFIX,
        mqtt_username=None,
        telemetry_keep=100,
        # The benchmark measures ingest itself, not the per-device budget that would drop most
        # of its bursts.
        device_reports_per_min=1e6,
        device_telemetry_per_min=1e6,
        device_events_per_min=1e6,
    )
    if db:
        settings = settings.model_copy(update={"db": db})
    hub = open_hub(settings)
    pubs: list[mqtt.Client] = []
    try:
        pw = hash_password("x")
        ids = [f"dev-{i:05d}" for i in range(max(devices, burst_devices))]
        with hub.core.sessions.begin() as s:
            tags = {"fleet": "bench"}
            s.add_all(Device(id=d, tags=tags, mqtt_password_hash=pw, token_hash=f"t-{d}") for d in ids)
            # The service the reports are about, deployed to every device: each state change
            # is also a possible change of the service's roll-up, which ingest checks.
            s.add(Deployment(name="svc", module_name="svc", module_version="1", manifest_digest=DIGEST,
                             settings=DeploymentSettings(port=80).model_dump(mode="json"),
                             target={"selector": {"fleet": "bench"}}))  # fmt: skip
            s.flush()
            # Ingest keeps only reports about services a device is assigned.
            s.add_all(
                DeviceDesired(device_id=d, generation=1, payload=assigning_svc(hub.core, d)) for d in ids
            )
            # A fleet that has run a while: each device holds its ``telemetry_keep`` samples
            # already, so every new sample also trims one (the steady state, not an empty table).
            before = T0 - timedelta(days=1)
            history = [
                {"device_id": d, "ts": before + timedelta(seconds=k), "received_at": before, "payload": {}}
                for d in ids[:devices]
                for k in range(settings.telemetry_keep)
            ]
            s.execute(insert(TelemetrySample), history)
        hub.start()
        worker = hub.ingest
        assert worker is not None
        pubs = [publisher(port) for _ in range(2)]

        sent = 0
        applied_before = worker.stats.applied
        elapsed = 0.0
        publish_s = 0.0
        for r in range(rounds):
            payloads = [(f"{PREFIX}/devices/{d}/reported", reported(d, r)) for d in ids[:devices]]
            start = time.perf_counter()
            publish_all(pubs, payloads)
            publish_s += time.perf_counter() - start
            sent += len(payloads)
            wait_received(worker, sent)
            elapsed += time.perf_counter() - start
        raw_applied = worker.stats.applied - applied_before
        coalesced_raw = worker.stats.coalesced

        samples, telemetry_s = 0, 0.0
        for r in range(rounds):
            payloads = [(f"{PREFIX}/devices/{d}/telemetry", telemetry(d, r)) for d in ids[:devices]]
            start = time.perf_counter()
            publish_all(pubs, payloads)
            samples += len(payloads)
            wait_received(worker, sent + samples)
            telemetry_s += time.perf_counter() - start
        with hub.core.sessions.begin() as s:
            # Every sample stored, and each device's history trimmed back to its newest keep.
            newest = s.scalar(select(func.count()).where(TelemetrySample.ts >= T0))
            assert newest == samples, f"{newest} of {samples} telemetry samples stored"
            stored = s.scalar(select(func.count()).select_from(TelemetrySample))
            assert stored == devices * settings.telemetry_keep, f"{stored} samples held after trimming"

        burst = burst_devices * burst_per_device
        payloads = [
            (
                f"{PREFIX}/devices/{ids[i % burst_devices]}/reported",
                reported(ids[i % burst_devices], rounds + i),
            )
            for i in range(burst)
        ]
        start = time.perf_counter()
        infos = [pubs[i % 2].publish(t, p, qos=1) for i, (t, p) in enumerate(payloads)]
        for info in infos:
            info.wait_for_publish(60)
        burst_publish_s = time.perf_counter() - start
        wait_received(worker, sent + samples + burst)
        burst_s = time.perf_counter() - start

        with hub.core.sessions.begin() as s:
            from cloud_hub.ingest.tables import DeviceReport

            last = s.get(DeviceReport, ids[(burst - 1) % burst_devices])
            assert last is not None and last.reported_at == T0 + timedelta(seconds=rounds + burst - 1), (
                f"the newest state of a device was lost: {last.reported_at if last else None} {worker.stats}"
            )
        return {
            "bench": "ingest",
            "db": hub.core.sessions.engine.dialect.name,
            "devices": devices,
            "rounds": rounds,
            "reported_msgs": sent,
            "reported_applied": raw_applied,
            "reported_coalesced": coalesced_raw,
            "reported_s": round(elapsed, 3),
            "reported_publish_s": round(publish_s, 3),
            "reported_msgs_per_s": round(sent / elapsed, 1),
            "telemetry_msgs": samples,
            "telemetry_s": round(telemetry_s, 3),
            "telemetry_msgs_per_s": round(samples / telemetry_s, 1),
            "burst_msgs": burst,
            "burst_devices": burst_devices,
            "burst_s": round(burst_s, 3),
            "burst_publish_s": round(burst_publish_s, 3),
            "burst_msgs_per_s": round(burst / burst_s, 1),
            # When publishing took nearly all the time, the burst figure is the publishers' limit.
            "burst_publisher_bound": burst_publish_s > 0.9 * burst_s,
            "coalesced": worker.stats.coalesced - coalesced_raw,
            "failed": worker.stats.failed,
            "rejected": worker.stats.rejected,
        }
    finally:
        for p in pubs:
            p.disconnect()
            p.loop_stop()
        hub.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def run_replicated(counts: list[int], devices: int, rounds: int) -> dict[str, object]:
    """Ingest rate of ``n`` hub processes on PostgreSQL, for each n in ``counts``."""
    import httpx
    from layout import DEVICE_ROW, Layout
    from sqlalchemy import create_engine, text

    from tests.hub.replica_fixtures import ADMIN

    layout = Layout.start()
    out: dict[str, object] = {"devices": devices, "rounds": rounds}
    try:
        for count in counts:
            db = layout.database()
            prefix = f"bench{count}"
            hubs = layout.hubs(count, db, prefix)
            engine = create_engine(db)
            pw = hash_password("x")
            ids = [f"dev-{i:05d}" for i in range(devices)]
            with engine.begin() as conn:
                rows = [{"id": d, "tags": "{}", "pw": pw, "tok": f"t-{d}"} for d in ids]
                conn.execute(text(DEVICE_ROW), rows)
            time.sleep(6)  # past the replicas' retained catch-up: only the shared subscription now
            pubs = [publisher(layout.broker.port) for _ in range(2)]
            sent, elapsed = 0, 0.0
            try:
                for r in range(rounds):
                    at = T0 + timedelta(seconds=r)
                    payloads = [(f"{prefix}/devices/{d}/reported", reported(d, r)) for d in ids]
                    start = time.perf_counter()
                    infos = [pubs[i % 2].publish(t, p, qos=1) for i, (t, p) in enumerate(payloads)]
                    for info in infos:
                        info.wait_for_publish(60)
                    sent += len(payloads)
                    deadline = time.monotonic() + 300
                    with engine.connect() as conn:
                        while (
                            conn.execute(
                                text("SELECT count(*) FROM device_reports WHERE reported_at = :t"), {"t": at}
                            ).scalar_one()
                            < devices
                        ):
                            if time.monotonic() > deadline:
                                raise SystemExit(f"round {r} was not applied by {count} replica(s)")
                            conn.rollback()
                            time.sleep(0.02)
                    elapsed += time.perf_counter() - start
            finally:
                for p in pubs:
                    p.disconnect()
                    p.loop_stop()
            received = 0
            for hub in hubs:
                auth = {"Authorization": f"Bearer {ADMIN}"}
                answer = httpx.get(f"{hub.url}/api/v1/dashboard/ingest", headers=auth)
                stats = answer.json()["stats"]
                received += stats["received"]
            with engine.connect() as conn:
                events = conn.execute(text("SELECT count(*) FROM events")).scalar_one()
            engine.dispose()
            layout.stop_hubs()
            out[f"replicas_{count}_msgs_per_s"] = round(sent / elapsed, 1)
            out[f"replicas_{count}_received"] = received
            out[f"replicas_{count}_events"] = events
            out[f"replicas_{count}_sent"] = sent
            print(f"{count} replica(s): {sent / elapsed:.0f} msg/s", file=sys.stderr)
    finally:
        layout.close()
    base, top = min(counts), max(counts)
    ratio = float(out[f"replicas_{top}_msgs_per_s"]) / float(out[f"replicas_{base}_msgs_per_s"])  # type: ignore[arg-type]
    once = all(out[f"replicas_{c}_received"] == out[f"replicas_{c}_sent"] == out[f"replicas_{c}_events"]
               for c in counts)  # fmt: skip
    out.update({"scaling_ratio": round(ratio, 2), "applied_once": once,
                "targets": {"scaling_ratio": 1.6}, "targets_met": ratio >= 1.6 and once})  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (a few seconds)")
    parser.add_argument("--db", help="SQLAlchemy URL of an EMPTY database (default: a fresh SQLite file)")
    parser.add_argument(
        "--postgres", action="store_true", help="a fresh PostgreSQL server (the tests' helper), not SQLite"
    )
    parser.add_argument("--replicas", help="e.g. 1,2: hub processes on PostgreSQL, one run per count")
    parser.add_argument("--devices", type=int, help="devices that report each round (default 2,000)")
    args = parser.parse_args()
    if args.replicas:
        counts = [int(c) for c in args.replicas.split(",")]
        devices, rounds = (500, 4) if args.quick else (2000, 6)
        result: dict[str, object] = {"bench": "ingest-replicated", **run_replicated(counts, devices, rounds)}
    else:
        layout = None
        db = args.db
        if args.postgres:
            from layout import Layout

            layout = Layout.start()
            db = layout.database()
        try:
            if args.quick:
                result = run(devices=500, rounds=4, burst_devices=50, burst_per_device=100, db=db)
            else:
                devices = args.devices or 2000
                rounds = 10 if devices <= 2000 else 3
                result = run(devices=devices, rounds=rounds, burst_devices=200, burst_per_device=250, db=db)
        finally:
            if layout is not None:
                layout.close()
    for key, value in result.items():
        print(f"{key:>22}: {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
