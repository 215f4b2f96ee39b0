"""A hub on a three-node RabbitMQ cluster: accounts through the management API, devices on the
other node than the hub, retained state node-local (so devices also fetch it over HTTP).
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from tests.conftest import Publisher
from tests.hub.broker_fixtures import MqttProbe
from tests.hub.conftest import HubFactory
from tests.hub.fleet_support import deploy, hub_trust, push, verified_state
from tests.hub.rabbitmq_fixtures import RabbitCluster
from tests.hub.test_replicas import healthy

pytestmark = [pytest.mark.xdist_group("rabbitmq"), pytest.mark.scale_out]


def connect_device(cluster: RabbitCluster, device_id: str, password: str, node: int = -1) -> MqttProbe:
    return MqttProbe.connect(
        "127.0.0.1", cluster.nodes[node].mqtt_port, username=device_id, password=password, client_id=device_id
    )


def test_a_hub_runs_its_fleet_on_a_rabbitmq_cluster(
    hub: HubFactory, rabbitmq: RabbitCluster, publisher: Publisher
) -> None:
    prefix = f"q{uuid.uuid4().hex[:8]}"
    h = hub(
        mqtt_host="127.0.0.1",
        mqtt_port=rabbitmq.nodes[0].mqtt_port,
        mqtt_username=f"hub-{uuid.uuid4().hex[:6]}",
        mqtt_password="hub-password-for-rabbitmq",
        mqtt_share_group=None,  # RabbitMQ 3.10 has no shared subscriptions
        topic_prefix=prefix,
        rabbitmq_api=rabbitmq.api,
    )
    assert h.process.link is not None and h.process.link.wait_connected(20)  # its own user was made
    pushed = push(h, publisher, "digits", "1")
    device_id = f"edge-{uuid.uuid4().hex[:6]}"
    with h.client() as http:
        enrolled = http.post("/api/v1/devices", json={"id": device_id, "tags": {"site": "x"}})
        creds = enrolled.json()["credentials"]
    device = connect_device(rabbitmq, device_id, creds["mqtt_password"])
    try:
        assert device.subscribe(f"{prefix}/devices/{device_id}/desired") == [1]
        time.sleep(0.5)
        with h.client() as http:
            assert deploy(http, "digits", pushed, selector="site=x").status_code == 201
        # Published on the hub's node, delivered on the device's: the cluster routes it.
        msg = device.expect(lambda m: m.topic.endswith("/desired") and m.payload != b"", timeout=20)
        state = verified_state(msg.payload, hub_trust(h), device_id)
        assert [m.service for m in state.modules] == ["digits"]
        # Retained messages stay on the node they were published to, so the agent's HTTP
        # fetch on connect is what a device on another node relies on.
        with httpx.Client(base_url=h.url, timeout=30) as http:
            auth = {"Authorization": f"Bearer {creds['token']}"}
            over_http = http.get("/api/v1/device/desired", headers=auth)
        assert json.loads(over_http.content)["signed"]["generation"] == state.generation

        device.publish(f"{prefix}/devices/{device_id}/reported", healthy(device_id, pushed.digest))
        with h.client() as http:
            deadline = time.monotonic() + 20
            while http.get("/api/v1/deployments/digits").json()["state"] != "Healthy":
                assert time.monotonic() < deadline, "the hub did not ingest the report from the other node"
                time.sleep(0.2)
            assert http.post(f"/api/v1/devices/{device_id}/revoke").status_code == 200
        # Revoked: its open connection is closed, and it cannot come back.
        deadline = time.monotonic() + 20
        while device.client.is_connected():
            assert time.monotonic() < deadline, "the revoked device is still connected"
            time.sleep(0.2)
    finally:
        device.close()
    with pytest.raises(ConnectionRefusedError):
        connect_device(rabbitmq, device_id, creds["mqtt_password"])
