"""A hub restarted on the same data dir comes back with everything it knew.

The story: a team registers a model, pushes the module carrying it, enrolls a device, deploys,
and the device reports Healthy over the real broker. The hub is stopped and started again on
the same data dir *without* the broker, so nothing can be re-learnt from retained messages:
whatever comes back comes from the database and the blob store.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from manifests.canonical import canonical_json
from manifests.digests import sha256_digest
from tests.factory import Forge
from tests.hub.broker_fixtures import Broker, MqttProbe
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import (
    PushedModule,
    deploy,
    desired_over_http,
    enroll,
    hub_trust,
    verified_state,
)
from tests.hub.test_registry_models import register
from tests.hub.test_registry_modules import push, stored_blobs


def reported(device_id: str, digest: str, state: str) -> bytes:
    now = datetime.now(UTC).isoformat()
    return json.dumps(
        {
            "schema": "edgepack.reported/v1",
            "device_id": device_id,
            "reported_at": now,
            "agent_version": "0.1.0-test",
            "applied_generation": 2,
            "modules": [
                {"service": "scaler", "manifest_digest": digest, "state": state, "reason": None, "since": now}
            ],
        }
    ).encode()


def wait_for(client: httpx.Client, path: str, predicate: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path).json()
        if predicate(body):
            return body
        assert time.monotonic() < deadline, f"{path} never reached the expected state: {body}"
        time.sleep(0.05)


def snapshot(hub: RunningHub, token: str) -> dict[str, Any]:
    """Everything a user or a device can see of the hub's state."""
    with hub.client() as client:
        return {
            "models": client.get("/api/v1/models").json(),
            "modules": client.get("/api/v1/modules").json(),
            "module": client.get("/api/v1/modules/scaler/versions/1/manifest").content,
            "devices": client.get("/api/v1/devices").json(),
            "device": client.get("/api/v1/devices/berlin-1").json(),
            "deployments": client.get("/api/v1/deployments").json(),
            "hub_key": client.get("/api/v1/hub/key").json(),
            "desired": desired_over_http(hub, token),
        }


def test_a_restart_loses_nothing(hub: HubFactory, forge: Forge, mosquitto: Broker, topic_prefix: str) -> None:
    weights = canonical_json({"factor": 3})
    files = {"src/score.py": b"# score\n", "model/model.json": weights}
    pushed = PushedModule("scaler", "1", forge.module(files=files, name="scaler"))
    first = hub(
        mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None
    )
    device = MqttProbe.connect(mosquitto.host, mosquitto.port)
    try:
        with first.client() as client:
            assert (
                register(client, "factor", {"model.json": weights}, tags={"stage": "prod"}).status_code == 201
            )
            module = push(client, forge.bundle(name="scaler", files=files)).json()
            assert module["manifest_digest"] == pushed.digest
            enrolled = enroll(client, "berlin-1", site="berlin")
            assert deploy(client, "scaler", pushed, selector="site=berlin").status_code == 201

            base = f"{topic_prefix}/devices/berlin-1"
            device.publish(f"{base}/online", b"true", retain=True)
            device.publish(
                f"{base}/reported", reported("berlin-1", module["manifest_digest"], "Healthy"), retain=True
            )
            wait_for(
                client,
                "/api/v1/devices/berlin-1",
                lambda d: d["online"] and [m["state"] for m in d["modules"]] == ["Healthy"],
            )
            wait_for(client, "/api/v1/deployments/scaler", lambda d: d["state"] == "Healthy")
        before = snapshot(first, enrolled.token)
        blobs_before = stored_blobs(first)
    finally:
        device.close()

    second = first.restart(mqtt_host=None)
    after = snapshot(second, enrolled.token)
    assert after == before
    assert stored_blobs(second) == blobs_before
    assert before["device"]["modules"][0]["state"] == "Healthy"  # the snapshot holds real state
    assert before["models"][0]["tags"] == {"stage": "prod"}

    with second.client() as client:
        blob = client.get("/api/v1/models/factor/versions/1/files/model.json")
        assert blob.content == weights and sha256_digest(blob.content) == sha256_digest(weights)
        # Generations keep rising across the restart, and the new state is signed by the same key.
        old = verified_state(before["desired"], hub_trust(second), "berlin-1").generation
        assert deploy(client, "scaler", pushed, selector="site=berlin", port=8899).status_code == 200
        new = verified_state(desired_over_http(second, enrolled.token), hub_trust(second), "berlin-1")
        assert new.generation == old + 1 and new.modules[0].settings.port == 8899
        # The registry still knows the deployment uses the module.
        assert client.delete("/api/v1/modules/scaler/versions/1").status_code == 409
