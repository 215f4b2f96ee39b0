"""What the agent does for the endpoints of issue 8: keys (Azure's authEnabled), TLS (its
sslEnabled) and the hub and broker over TLS — against a real hub, broker and agent."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud_hub.tls.ca import make_ca
from tests.agent.conftest import Fleet, free_port, start_fleet, stop_fleet, wait_for
from tests.conftest import Publisher
from tests.hub.broker_fixtures import BrokerFactory
from tests.hub.conftest import HubFactory

SCORE = {"data": [1, 2]}


def deploy_with(fleet: Fleet, port: int, **azure: object) -> None:
    fleet.push("demo", "1")
    with fleet.http() as http:
        r = http.put("/api/v1/deployments/demo", json={
            "module": "demo", "version": "1", "target": {"devices": ["edge-1"]},
            "deployment_config": {"computeType": "local", "port": port,
                                  "edgepack": {"runtime": "process"}, **azure}})  # fmt: skip
    assert r.status_code == 201, r.text


def test_an_endpoint_with_keys_takes_either_key_and_a_rotation_needs_no_restart(fleet: Fleet) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    deploy_with(fleet, port, authEnabled=True)
    agent.wait_state("demo", "Healthy")
    with fleet.http() as http:
        keys = http.get("/api/v1/deployments/demo/keys").json()
    url = f"http://127.0.0.1:{port}/score"
    assert httpx.post(url, json=SCORE).status_code == 401
    for key in (keys["primary"], keys["secondary"]):
        r = httpx.post(url, json=SCORE, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json() == {"result": [2, 4]}
    pid = agent.service("demo")["pid"]  # type: ignore[index]
    # The agent can still read the module's metrics with its own key: telemetry flows.
    def charted() -> bool:
        for _ in range(5):  # requests between two samples: a rate above zero
            httpx.post(url, json=SCORE, headers={"Authorization": f"Bearer {keys['primary']}"})
        with fleet.http() as http:
            points = http.get("/api/v1/dashboard/telemetry", params={"bucket_s": 1}).json()["services"]
        return any(p["rps"] for p in points.get("demo", []))

    wait_for(charted, timeout=30, what="telemetry from the keyed module")

    with fleet.http() as http:
        answer = http.post("/api/v1/deployments/demo/keys/regenerate", json={"key": "primary"})
    rotated = answer.json()["keys"]
    assert rotated["primary"] != keys["primary"]

    def new_key_works() -> bool:
        r = httpx.post(url, json=SCORE, headers={"Authorization": f"Bearer {rotated['primary']}"})
        return r.status_code == 200

    wait_for(new_key_works, timeout=20, what="the rotated key to be accepted", log=agent.log)
    old = httpx.post(url, json=SCORE, headers={"Authorization": f"Bearer {keys['primary']}"})
    assert old.status_code == 401
    assert agent.service("demo")["pid"] == pid, "a key rotation must not restart the module"  # type: ignore[index]


def test_an_ssl_enabled_endpoint_serves_https_with_a_certificate_from_the_endpoint_ca(
    fleet: Fleet, tmp_path: Path
) -> None:
    agent = fleet.device("edge-1").start()
    port = free_port()
    deploy_with(fleet, port, sslEnabled=True)
    fleet.wait_rollup("demo", "Healthy")
    body = fleet.rollup("demo")
    assert body["devices"][0]["endpoint"] == f"https://127.0.0.1:{port}"
    ca = tmp_path / "endpoint-ca.pem"
    ca.write_bytes(httpx.get(fleet.hub.url + "/api/v1/hub/endpoint-ca").content)
    verify = ssl.create_default_context(cafile=str(ca))
    r = httpx.post(f"https://127.0.0.1:{port}/score", json=SCORE, verify=verify)
    assert r.status_code == 200 and r.json() == {"result": [2, 4]}
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.post(f"https://127.0.0.1:{port}/score", json=SCORE)  # the system's CAs do not know it
    key = agent.state_dir / "tls" / "demo" / "key.pem"
    assert key.stat().st_mode & 0o077 == 0, "the private key stays the agent's"


@pytest.fixture
def tls_fleet(
    hub: HubFactory,
    broker_factory: BrokerFactory,
    topic_prefix: str,
    publisher: Publisher,
    tmp_path: Path,
) -> Iterator[Fleet]:
    running = start_fleet(hub, broker_factory, topic_prefix, publisher, tmp_path, tls=True)
    yield running
    stop_fleet(running)


def test_the_agent_talks_to_hub_and_broker_over_tls_verified_with_the_ca_it_was_given(
    tls_fleet: Fleet,
) -> None:
    assert tls_fleet.hub.url.startswith("https://")
    agent = tls_fleet.device("edge-1").start()
    assert agent.credentials["mqtt"]["tls"] and agent.credentials["ca_pem"]
    port = free_port()
    module = tls_fleet.push("demo", "1")
    tls_fleet.deploy("demo", module, port=port, devices=["edge-1"])
    tls_fleet.wait_rollup("demo", "Healthy")
    assert httpx.post(f"http://127.0.0.1:{port}/score", json=SCORE).json() == {"result": [2, 4]}

    # A device given another CA trusts neither the hub nor the broker: it runs nothing.
    stranger = tls_fleet.device("edge-2")
    creds = json.loads(stranger.config.credentials.read_text())
    creds["ca_pem"] = make_ca("not the hub's").cert_pem.decode()
    stranger.config.credentials.write_text(json.dumps(creds))
    stranger.start()
    tls_fleet.deploy("other", tls_fleet.push("other", "1"), port=free_port(), devices=["edge-2"])
    def refused() -> bool:
        text = stranger.log()
        return "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text

    wait_for(refused, timeout=30, what="the refused TLS handshake", log=stranger.log)
    time.sleep(1.0)
    assert stranger.service("other") is None
