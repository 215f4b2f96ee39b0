"""Several hub processes behind nginx on one PostgreSQL, one S3 store and one broker.

Real processes throughout: ``edgepack hub serve`` twice, Debian's nginx, the session's
PostgreSQL, SeaweedFS and Mosquitto. What a team scaling out needs to be true: either replica
answers the same, device messages are ingested exactly once between them, and killing one
(SIGKILL, mid-deploy or mid-push) loses nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from manifests.signing import TrustStore, load_public_key
from tests.conftest import Publisher
from tests.factory import Forge, default_files
from tests.hub.broker_fixtures import Broker
from tests.hub.fleet_support import verified_state
from tests.hub.replica_fixtures import ReplicaSet, ReplicaSetFactory
from tests.hub.test_ingest import T0
from tests.hub.webhook_receiver import start_receiver

pytestmark = pytest.mark.scale_out

EDGEPACK = [sys.executable, "-m", "packager"]
BUNDLE = {"Content-Type": "application/vnd.edgepack.module+tar"}


def healthy(device_id: str, digest: str) -> bytes:
    """A device's reported state: the service runs, Healthy."""
    module = {"service": "digits", "manifest_digest": digest, "state": "Healthy", "since": T0.isoformat()}
    return json.dumps(
        {"schema": "edgepack.reported/v1", "device_id": device_id, "reported_at": T0.isoformat(),
         "agent_version": "0.1.0", "applied_generation": 2, "modules": [module]}
    ).encode()  # fmt: skip


def hub_trust_from_key(url: str) -> TrustStore:
    key = httpx.get(f"{url}/api/v1/hub/key").json()["public_key"]
    return TrustStore().with_key(load_public_key(key.encode()), name="hub")


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return result


def push(rs: ReplicaSet, publisher: Publisher, name: str = "digits", **files: bytes) -> str:
    bundle = Forge(publisher=publisher.key).bundle(files=files or default_files(2), name=name, version="1")
    with rs.client() as http:
        r = http.post("/api/v1/modules", content=bundle, headers=BUNDLE)
        assert r.status_code == 201, r.text
        return str(r.json()["manifest_digest"])


def enroll_many(rs: ReplicaSet, count: int, **tags: str) -> dict[str, str]:
    tokens = {}
    with rs.client() as http:
        for i in range(count):
            r = http.post("/api/v1/devices", json={"id": f"dev-{i:03d}", "tags": tags})
            assert r.status_code == 201, r.text
            tokens[f"dev-{i:03d}"] = r.json()["credentials"]["token"]
    return tokens


def deploy_body(selector: str, port: int = 8890) -> dict[str, Any]:
    return {"module": "digits", "version": "1", "settings": {"port": port}, "target": {"selector": selector}}


def generations(rs: ReplicaSet) -> dict[str, tuple[int, int | None]]:
    """device → (generation, published generation), straight from the database."""
    engine = create_engine(rs.db)
    try:
        with engine.connect() as conn:
            query = "SELECT device_id, generation, published_generation FROM device_desired"
            rows = conn.execute(text(query))
            return {d: (g, p) for d, g, p in rows}
    finally:
        engine.dispose()


def retained_generations(broker: Broker, prefix: str, seconds: float = 1.5) -> dict[str, int]:
    probe = broker.probe()
    try:
        assert probe.subscribe(f"{prefix}/devices/+/desired") == [1]
        got = probe.received_within(lambda m: m.retain and m.payload != b"", seconds)
        return {m.topic.split("/")[-2]: json.loads(m.payload)["signed"]["generation"] for m in got}
    finally:
        probe.close()


def all_published(rs: ReplicaSet, broker: Broker) -> Callable[[], bool]:
    def check() -> bool:
        db = generations(rs)
        return retained_generations(broker, rs.prefix) == {d: g for d, (g, _p) in db.items()}

    return check


@pytest.fixture
def paused_broker(mosquitto: Broker) -> Iterator[Callable[[bool], None]]:
    """``pause(True)`` freezes the broker (SIGSTOP): connections stay, nothing is answered."""

    def pause(on: bool) -> None:
        mosquitto.process.send_signal(signal.SIGSTOP if on else signal.SIGCONT)

    yield pause
    mosquitto.process.send_signal(signal.SIGCONT)


def test_either_replica_answers_the_same_and_messages_are_ingested_once(
    replica_set: ReplicaSetFactory, publisher: Publisher, mosquitto: Broker, tmp_path: Any
) -> None:
    rs = replica_set(2)
    started = time.monotonic()
    digest = push(rs, publisher)
    tokens = enroll_many(rs, 12, site="berlin")
    with rs.client() as http:
        assert http.put("/api/v1/deployments/digits", json=deploy_body("site=berlin")).status_code == 201

    wait_for(all_published(rs, mosquitto), "every device's state should be published once")
    for path in ("/api/v1/devices", "/api/v1/deployments", "/api/v1/modules", "/api/v1/dashboard/events"):
        answers = []
        for replica in rs.replicas:
            with replica.client() as http:
                answers.append(http.get(path).json())
        assert answers[0] == answers[1], path
    cli = subprocess.run(
        [*EDGEPACK, "device", "list", "--json"],
        env={**os.environ, "EDGEPACK_HOME": str(tmp_path), "EDGEPACK_HUB_URL": rs.url,
             "EDGEPACK_TOKEN": rs.admin_token},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert sorted(d["id"] for d in json.loads(cli.stdout)) == sorted(tokens)

    # Past the replicas' retained catch-up, each device message reaches exactly one replica.
    time.sleep(max(0.0, 6.5 - (time.monotonic() - started)))
    before = [ingest_stats(r) for r in rs.replicas]
    devices = [mosquitto.probe() for _ in range(2)]
    try:
        for n, device_id in enumerate(sorted(tokens)):
            probe = devices[n % 2]
            probe.publish(f"{rs.prefix}/devices/{device_id}/online", b"true", retain=True)
            probe.publish(
                f"{rs.prefix}/devices/{device_id}/reported",
                healthy(device_id, digest),
                retain=True,
            )
        sent = 2 * len(tokens)

        def received() -> list[int]:
            now = [ingest_stats(r)["received"] for r in rs.replicas]
            return [n - b["received"] for n, b in zip(now, before, strict=True)]

        wait_for(lambda: sum(received()) >= sent, "the messages did not all arrive")
        time.sleep(1)
        counts = received()
        assert sum(counts) == sent and all(c > 0 for c in counts), counts  # split, none twice
        with rs.client() as http:
            events = http.get("/api/v1/dashboard/events").json()["events"]
            came_online = sorted(e["device_id"] for e in events if e["kind"] == "online")
            assert came_online == sorted(tokens)
            svc = http.get("/api/v1/deployments/digits").json()
            assert svc["state"] == "Healthy" and len(svc["devices"]) == len(tokens)
    finally:
        for probe in devices:
            probe.close()


def ingest_stats(replica: Any) -> dict[str, int]:
    with replica.client() as http:
        stats: dict[str, int] = http.get("/api/v1/dashboard/ingest").json()["stats"]
        return stats


def test_a_replica_killed_mid_deploy_loses_nothing(
    replica_set: ReplicaSetFactory,
    publisher: Publisher,
    mosquitto: Broker,
    paused_broker: Callable[[bool], None],
) -> None:
    rs = replica_set(2)
    doomed = rs.replicas[0]
    push(rs, publisher)
    tokens = enroll_many(rs, 30, site="berlin")
    wait_for(all_published(rs, mosquitto), "the enrolments should be published")
    before = generations(rs)

    # A frozen broker holds the doomed replica inside its publish, after its commit.
    paused_broker(True)
    answer: list[Any] = []

    def deploy() -> None:
        try:
            with doomed.client() as http:
                answer.append(http.put("/api/v1/deployments/digits", json=deploy_body("site=berlin")))
        except httpx.HTTPError as exc:
            answer.append(exc)

    worker = threading.Thread(target=deploy)
    worker.start()
    wait_for(
        lambda: all(g == before[d][0] + 1 for d, (g, _p) in generations(rs).items()),
        "the deploy should commit new generations",
    )
    doomed.kill()
    paused_broker(False)
    worker.join(30)
    assert answer and not isinstance(answer[0], httpx.Response), "the doomed replica answered"
    unpublished = [d for d, (g, p) in generations(rs).items() if g != p]
    assert unpublished, "the kill should have come before the publish finished"

    # The survivor publishes what the dead replica committed, and serves the rest.
    wait_for(all_published(rs, mosquitto), "the survivor did not finish the publish", timeout=60)
    trust = hub_trust_from_key(rs.url)
    with httpx.Client(base_url=rs.url, timeout=30) as http:
        for device_id, token in tokens.items():
            body = http.get("/api/v1/device/desired", headers={"Authorization": f"Bearer {token}"}).content
            state = verified_state(body, trust, device_id)
            assert [m.service for m in state.modules] == ["digits"]
    with rs.client() as http:  # and it is the only one left behind nginx
        assert http.get("/api/v1/deployments/digits").status_code == 200

    # Ingest goes on without the dead replica.
    device = mosquitto.probe()
    try:
        device.publish(f"{rs.prefix}/devices/dev-007/online", b"true", retain=True)
        with rs.client() as http:
            wait_for(
                lambda: any(
                    e["kind"] == "online" and e["device_id"] == "dev-007"
                    for e in http.get("/api/v1/dashboard/events").json()["events"]
                ),
                "the survivor did not ingest",
            )
    finally:
        device.close()


def test_a_replica_killed_mid_push_leaves_nothing_and_the_push_succeeds_again(
    replica_set: ReplicaSetFactory, publisher: Publisher
) -> None:
    rs = replica_set(2)
    doomed = rs.replicas[0]
    model = os.urandom(24 << 20)
    bundle = Forge(publisher=publisher.key).bundle(
        files={"src/score.py": b"def init(): pass\n", "model/w.bin": model}, name="big", version="1"
    )
    half, killed = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield bundle[: len(bundle) // 2]
        half.set()
        killed.wait(60)  # the replica dies meanwhile
        yield bundle[len(bundle) // 2 :]

    def push_to_doomed() -> None:
        with doomed.client() as http, pytest.raises(httpx.HTTPError):
            http.post("/api/v1/modules", content=body(), headers=BUNDLE)

    worker = threading.Thread(target=push_to_doomed)
    worker.start()
    assert half.wait(60)
    time.sleep(1)  # let it stream into the store
    doomed.kill()
    killed.set()
    worker.join(60)
    with rs.client() as http:
        assert http.get("/api/v1/modules").json() == []
        again = http.post("/api/v1/modules", content=bundle, headers=BUNDLE)
        assert again.status_code == 201, again.text
        got = http.get("/api/v1/modules/big/versions/1").json()
        blob = next(f["digest"] for f in got["files"] if f["path"] == "model/w.bin")
        assert http.get(f"/api/v1/blobs/{blob}").content == model


def test_two_replicas_renewing_at_once_renew_each_state_once(
    replica_set: ReplicaSetFactory, mosquitto: Broker
) -> None:
    rs = replica_set(2, upkeep_s=0.3)
    enroll_many(rs, 20)
    wait_for(all_published(rs, mosquitto), "the enrolments should be published")
    before = generations(rs)
    engine = create_engine(rs.db)
    try:
        with engine.begin() as conn:
            soon = datetime.now(UTC) + timedelta(minutes=1)
            conn.execute(text("UPDATE device_desired SET expires = :t"), {"t": soon})
    finally:
        engine.dispose()
    wait_for(
        lambda: all(g > before[d][0] for d, (g, _p) in generations(rs).items()), "the states were not renewed"
    )
    time.sleep(2)  # many more upkeep rounds of both replicas
    assert {d: g for d, (g, _p) in generations(rs).items()} == {d: g + 1 for d, (g, _p) in before.items()}
    wait_for(all_published(rs, mosquitto), "the renewed states should be published")


def test_two_replicas_fire_an_alert_once_and_deliver_each_webhook_event_once(
    replica_set: ReplicaSetFactory,
) -> None:
    # Both replicas run an alert loop and a webhook dispatcher on the one database, rounds
    # every second: neither may fire the alert or send an event the other one did.
    fast = {"EDGEPACK_HUB_ALERT_INTERVAL_S": "1", "EDGEPACK_HUB_WEBHOOK_POLL_S": "0.05"}
    rs = replica_set(2, extra_env=fast)
    receiver = start_receiver()
    try:
        with rs.replicas[0].client() as http:
            wanted = {"url": receiver.url, "events": ["device.enrolled", "alert.fired"]}
            r = http.post("/api/v1/webhooks", json=wanted)
            assert r.status_code == 201, r.text
            receiver.secret = r.json()["secret"]
            r = http.post("/api/v1/alerts/rules", json={"name": "gone", "condition": "device offline > 15m"})
            assert r.status_code == 201, r.text
        with rs.replicas[1].client() as http:
            many = {"devices": [{"id": f"dev-{i:03d}"} for i in range(200)]}
            r = http.post("/api/v1/devices/bulk", json=many)
            assert r.status_code == 201, r.text
        # Heard of a minute ago, all but dev-007: an hour ago (what ingest writes).
        engine = create_engine(rs.db)
        try:
            with engine.begin() as conn:
                now = datetime.now(UTC)
                conn.execute(text("UPDATE devices SET last_seen = :t"), {"t": now - timedelta(minutes=1)})
                conn.execute(text("UPDATE devices SET last_seen = :t WHERE id = 'dev-007'"),
                             {"t": now - timedelta(hours=1)})  # fmt: skip
        finally:
            engine.dispose()

        events = receiver.wait_for(201, timeout=60)
        time.sleep(3)  # three more rounds of each replica: a second copy would have come by now
        assert len(receiver.ids()) == len(set(receiver.ids())) == 201
        fired = [e for e in events if e["type"] == "edgepack.alert.fired"]
        assert len(fired) == 1 and fired[0]["data"]["device"] == "dev-007"
        with rs.client() as http:
            logged = http.get("/api/v1/dashboard/events").json()["events"]
        assert [e["device_id"] for e in logged if e["kind"] == "alert.fired"] == ["dev-007"]
    finally:
        assert receiver.server is not None
        receiver.server.shutdown()
