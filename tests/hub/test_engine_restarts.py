"""The engines under the hub restarted while it works: PostgreSQL under load, a RabbitMQ node.

(Mosquitto restarted without persistence is test_republish_on_reconnect.py.)
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from cloud_hub.ingest.tables import DeviceReport
from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker, MqttProbe
from tests.hub.conftest import HubFactory
from tests.hub.fleet_support import deploy, enroll, hub_trust, push, verified_state
from tests.hub.postgres_fixtures import PostgresServer, find_postgres_bin, start_postgres
from tests.hub.rabbitmq_fixtures import RabbitCluster
from tests.hub.test_ingest import T0, reported

pytestmark = pytest.mark.scale_out


def report(device_id: str, seq: int) -> bytes:
    return reported(device_id, seq, ("digits", "Healthy", None))


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own, since it restarts it (torn down after the test's hubs)."""
    server = start_postgres(find_postgres_bin())
    yield server
    server.stop()


def test_the_database_restarted_under_load_loses_no_newest_state(
    own_postgres: PostgresServer, hub: HubFactory, mosquitto: Broker, topic_prefix: str, publisher: Publisher
) -> None:
    server = own_postgres
    h = hub(
        postgres=server.url,
        mqtt_host=mosquitto.host,
        mqtt_port=mosquitto.port,
        topic_prefix=topic_prefix,
        mqtt_username=None,
    )
    pushed = push(h, publisher, "digits", "1")
    devices = [f"dev-{i}" for i in range(5)]
    with h.client() as http:
        for d in devices:
            enroll(http, d, site="x")
        assert deploy(http, "digits", pushed, selector="site=x").status_code == 201
    probe = mosquitto.probe()
    stop, seq = threading.Event(), [0]

    def load() -> None:
        while not stop.is_set():
            seq[0] += 1
            for d in devices:
                probe.publish(f"{topic_prefix}/devices/{d}/reported", report(d, seq[0]))
            time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1)
        server.restart(down_s=2)  # every connection of the pool dies; ingest and upkeep go on
        time.sleep(1)
    finally:
        stop.set()
        worker.join(30)
    final = seq[0] + 1
    for d in devices:
        probe.publish(f"{topic_prefix}/devices/{d}/reported", report(d, final))
    probe.close()

    def newest_stored() -> bool:
        with h.core.sessions.begin() as s:
            rows = [s.get(DeviceReport, d) for d in devices]
            return all(r is not None and r.reported_at == T0 + timedelta(seconds=final) for r in rows)

    deadline = time.monotonic() + 30
    while not newest_stored():
        assert time.monotonic() < deadline, "the newest reported states did not land after the restart"
        time.sleep(0.2)
    with h.client() as http:  # and the API and fleet changes work again
        assert deploy(http, "digits", pushed, selector="site=x", port=8891).status_code == 200
        assert len(http.get("/api/v1/devices").json()["devices"]) == len(devices)


@pytest.mark.xdist_group("rabbitmq")
def test_a_rabbitmq_node_restarted_under_the_hub(
    hub: HubFactory, rabbitmq: RabbitCluster, publisher: Publisher
) -> None:
    hub_node, device_node = rabbitmq.nodes[0], rabbitmq.nodes[-1]
    prefix = f"r{uuid.uuid4().hex[:8]}"
    h = hub(
        mqtt_host="127.0.0.1",
        mqtt_port=hub_node.mqtt_port,
        mqtt_username=f"hub-{uuid.uuid4().hex[:6]}",
        mqtt_password="hub-password-for-rabbitmq",
        mqtt_share_group=None,
        topic_prefix=prefix,
        rabbitmq_api=device_node.api,  # reachable while the hub's node is down
    )
    link = h.process.link
    assert link is not None and link.wait_connected(20)
    pushed = push(h, publisher, "digits", "1")
    device_id = f"edge-{uuid.uuid4().hex[:6]}"
    with h.client() as http:
        answer = http.post("/api/v1/devices", json={"id": device_id, "tags": {"site": "r"}})
        password = answer.json()["credentials"]["mqtt_password"]
    device = MqttProbe.connect(
        "127.0.0.1", device_node.mqtt_port, username=device_id, password=password, client_id=device_id
    )
    try:
        assert device.subscribe(f"{prefix}/devices/{device_id}/desired") == [1]
        rabbitmq.stop_node(hub_node)  # the hub's node crashes ...
        deadline = time.monotonic() + 20
        while link.connected:
            assert time.monotonic() < deadline, "the hub did not notice its broker went away"
            time.sleep(0.1)
        rabbitmq.start_node(hub_node)  # ... and comes back into the cluster
        assert link.wait_connected(90), "the hub did not reconnect"
        with h.client() as http:
            deployed = deploy(http, "digits", pushed, selector="site=r")
            assert deployed.status_code == 201
            generation = deployed.json()["issued"][device_id]
        # (The states republished on reconnect arrive first; the deploy's is the one to wait for.)
        msg = device.expect(
            lambda m: m.payload != b"" and json.loads(m.payload)["signed"]["generation"] == generation,
            timeout=30,
        )
        state = verified_state(msg.payload, hub_trust(h), device_id)
        assert [m.service for m in state.modules] == ["digits"]
    finally:
        device.close()
        if hub_node.process is None:
            rabbitmq.start_node(hub_node)
