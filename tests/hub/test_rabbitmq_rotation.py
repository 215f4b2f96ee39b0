"""Credential rotation on a RabbitMQ broker: the new user is made beside the old one with the
device's topic permissions (the client id stays the device id), and only the confirmation
removes the old user; the test acts as the device."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manifests.join import derive_secrets
from manifests.rotation import CONFIRM_PATH, REQUEST_PATH, make_rotation_request
from tests.hub.broker_fixtures import MqttProbe
from tests.hub.conftest import HubFactory
from tests.hub.rabbitmq_fixtures import RabbitCluster
from tests.waiting import wait_for

pytestmark = [pytest.mark.xdist_group("rabbitmq"), pytest.mark.scale_out]


def _accepts(cluster: RabbitCluster, username: str, password: str, client_id: str, topic: str) -> bool:
    try:
        probe = MqttProbe.connect("127.0.0.1", cluster.nodes[-1].mqtt_port, username=username,
                                  password=password, client_id=client_id)  # fmt: skip
    except ConnectionRefusedError:
        return False
    try:
        return probe.subscribe(topic) == [1]
    finally:
        probe.close()


def test_rotation_on_rabbitmq_keeps_both_users_until_the_device_confirms(
    hub: HubFactory, rabbitmq: RabbitCluster
) -> None:
    prefix = f"q{uuid.uuid4().hex[:8]}"
    h = hub(
        mqtt_host="127.0.0.1", mqtt_port=rabbitmq.nodes[0].mqtt_port,
        mqtt_username=f"hub-{uuid.uuid4().hex[:6]}",
        mqtt_password="hub-password-for-rabbitmq", mqtt_share_group=None, topic_prefix=prefix,
        rabbitmq_api=rabbitmq.api,
    )  # fmt: skip
    device_id = f"edge-{uuid.uuid4().hex[:6]}"
    desired = f"{prefix}/devices/{device_id}/desired"
    with h.client() as http:
        creds = http.post("/api/v1/devices", json={"id": device_id, "tags": {}}).json()["device_credentials"]
        assert http.post(f"/api/v1/devices/{device_id}/rotate").status_code == 200
        keyid = http.get("/api/v1/hub/key").json()["keyid"]
    old = (creds["mqtt"]["username"], creds["mqtt"]["password"])
    key = Ed25519PrivateKey.generate()
    secrets = derive_secrets(key)
    body = make_rotation_request(key, device_id=device_id, hub_keyid=keyid, nonce="6" * 32,
                                 now=datetime.now(UTC))  # fmt: skip
    with h.client(token=creds["token"]) as http:
        answer = http.post(REQUEST_PATH, content=body)
    assert answer.status_code == 200, answer.text
    new = (answer.json()["mqtt_username"], secrets.mqtt_password)
    assert new[0] == f"{device_id}~r1"
    # Both users work, each with the device's own topics (client id: the device id).
    wait_for(lambda: _accepts(rabbitmq, *new, device_id, desired), timeout=30, what="the new RabbitMQ user")
    assert _accepts(rabbitmq, *old, device_id, desired)
    with h.client(token=secrets.token) as http:
        assert http.post(CONFIRM_PATH).status_code == 200
    assert not _accepts(rabbitmq, *old, device_id, desired)
    assert _accepts(rabbitmq, *new, device_id, desired)
