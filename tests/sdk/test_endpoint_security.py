"""``Service.run`` on a service deployed with ``auth_enabled`` and ``ssl_enabled``: it sends the
service's key and verifies its HTTPS with the hub's endpoint CA, by itself.

The device side is what the agent's contract (docs/security.md) says it does, done here by
hand: the scoring server runs with the key hashes of the signed desired state and a certificate
from the hub's endpoint CA, and the device reports where it serves over its MQTT topic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from manifests.errors import FetchError
from manifests.reported import ModuleStatus, ReportedState
from manifests.signing import public_key_pem
from manifests.states import ServiceState
from packager.sdk import DeploymentConfig, Device, Hub, Module
from packager.sdk.local import install_bundle, trust_store
from packager.sdk.targets import Selector
from tests.conftest import Publisher, free_port
from tests.factory import Forge
from tests.hub.broker_fixtures import Broker, MqttProbe
from tests.hub.conftest import HubFactory
from tests.hub.test_endpoint_keys import _csr
from tests.sdk.conftest import sdk_hub

SCRIPT = b"def init():\n    pass\n\n\ndef run(raw_data):\n    return {'ok': True}\n"


def write_keys(path: Path, hashes: list[str]) -> None:
    """What the agent does with a desired state's auth: the hashes, into the server's file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": hashes}))
    os.replace(tmp, path)


def test_run_sends_the_key_and_verifies_the_endpoint_ca(
    hub: HubFactory,
    mosquitto: Broker,
    topic_prefix: str,
    publisher: Publisher,
    forge: Forge,
    sdk_home: Path,
    tmp_path: Path,
) -> None:
    running = hub(
        mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None
    )
    h: Hub = sdk_hub(running)
    bundle = tmp_path / "keyed-1.edgepack"
    bundle.write_bytes(forge.bundle(name="keyed", files={"src/score.py": SCRIPT, "model/m.bin": b"x"}))
    pushed = Module.push(h, bundle)
    creds = Device.enroll(h, "dev-k", tags={"site": "lab"})
    port = free_port()
    config = DeploymentConfig(port=port, auth_enabled=True, ssl_enabled=True, runtime="process")
    service = h.deploy("keyed", "keyed:1", config, Selector(site="lab"))
    assert service.settings.auth is not None and service.settings.tls is not None

    # The device: the module verified into its cache, the key hashes, a certificate for its address.
    pub = tmp_path / "publisher.pub"
    pub.write_bytes(public_key_pem(publisher.key.public_key()))
    installed = install_bundle(bundle, trust_store([pub]), tmp_path / "cache", progress=False)
    keys_file = tmp_path / "keys.json"
    write_keys(keys_file, service.settings.auth.key_sha256)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = httpx.post(
        f"{running.url}/api/v1/device/certificates",
        json={"service": "keyed", "csr_pem": _csr(key, "dev-k.local", "127.0.0.1")},
        headers={"Authorization": f"Bearer {creds.token}"},
    ).json()
    cert, key_file = tmp_path / "svc.crt", tmp_path / "svc.key"
    cert.write_text(issued["cert_pem"])
    pkcs8 = serialization.PrivateFormat.PKCS8
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    command = [sys.executable, "-m", "edge_agent.scoring", "--module-dir", str(installed.dir)]
    options = ["--port", str(port), "--preload", "--auth-keys-file", str(keys_file)]
    tls = ["--tls-cert", str(cert), "--tls-key", str(key_file)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = subprocess.Popen([*command, *options, *tls], **quiet)
    probe = MqttProbe.connect(mosquitto.host, mosquitto.port)
    try:
        now = datetime.now(UTC)
        status = ModuleStatus(
            service="keyed",
            manifest_digest=pushed.manifest_digest,
            state=ServiceState.HEALTHY,
            since=now,
            endpoint=f"http://127.0.0.1:{port}",  # where it listens, as the agent reports it
        )
        report = ReportedState(
            device_id="dev-k", reported_at=now, agent_version="t", applied_generation=2, modules=[status]
        )
        probe.publish(
            f"{topic_prefix}/devices/dev-k/reported", report.model_dump_json(by_alias=True), retain=True
        )
        deadline = time.monotonic() + 30
        while service.refresh().state != ServiceState.HEALTHY:
            assert time.monotonic() < deadline, service.devices
            time.sleep(0.1)
        while True:  # the server listens once init() ran
            try:
                answer = service.run({"data": [1]})
                break
            except FetchError as exc:
                assert "cannot connect" in str(exc) and time.monotonic() < deadline, exc
                time.sleep(0.1)
        assert answer == {"ok": True}  # over HTTPS, with the primary key, found by itself
        with pytest.raises(FetchError, match="401"):
            service.run({"data": [1]}, key="not-a-key")
        primary, secondary = service.get_keys()
        assert service.run("{}", key=secondary) == {"ok": True}

        rotated = service.regen_key("Primary")
        assert rotated.keys.primary != primary and rotated.keys.secondary == secondary
        assert list(rotated.issued) == ["dev-k"]
        write_keys(keys_file, service.refresh().settings.auth.key_sha256)  # type: ignore[union-attr]
        time.sleep(1.5)  # the server re-reads its keys file within a second
        assert service.run("{}") == {"ok": True}
        with pytest.raises(FetchError, match="401"):
            service.run("{}", key=primary)
        # Without the endpoint CA no one trusts the device's certificate.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.post(
                f"https://127.0.0.1:{port}/score", json={}, headers={"Authorization": f"Bearer {secondary}"}
            )
    finally:
        probe.close()
        server.terminate()
        server.wait(timeout=20)
