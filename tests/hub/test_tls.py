"""Issue 8: TLS everywhere, on by default outside loopback. A CA made by
``edgepack hub broker-config --tls``, Mosquitto listening with TLS from the generated config, the
hub serving HTTPS, enrolment handing devices the CA, and clients with another CA refused."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from cloud_hub.broker.mosquitto import BrokerTLS, BrokerUser, write_broker_files
from cloud_hub.broker.passwords import hash_password
from cloud_hub.settings import HubSettings
from cloud_hub.tls.ca import make_ca
from cloud_hub.tls.material import TlsFiles, make_tls_material, with_default_tls
from manifests.device import DeviceCredentials
from manifests.errors import ConfigError
from tests.conftest import Publisher
from tests.hub.broker_fixtures import MOSQUITTO, BrokerFactory, MqttProbe, free_port, start_mosquitto
from tests.hub.conftest import HubFactory
from tests.hub.fleet_support import deploy, push
from tests.hub.test_fleet_cli import EDGEPACK, env_for, one_line_error

pytestmark = pytest.mark.sql_independent


def _material(tmp_path: Path) -> tuple[TlsFiles, Path]:
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    files = make_tls_material(
        HubSettings(data_dir=tmp_path / "hub"),
        hub_hosts=["127.0.0.1", "localhost"],
        broker_hosts=["127.0.0.1", "localhost"],
        broker_dir=broker_dir,
    )
    return files, broker_dir


def _other_ca(tmp_path: Path) -> Path:
    other = tmp_path / "other-ca.crt"
    other.write_bytes(make_ca("not ours").cert_pem)
    return other


def test_the_broker_speaks_only_tls_and_refuses_a_client_with_another_ca(
    tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    files, broker_dir = _material(tmp_path)
    write_broker_files(
        broker_dir,
        prefix="tls",
        hub=BrokerUser("edgepack-hub", hash_password("hub-pw")),
        devices=[BrokerUser("dev-a", hash_password("pw-a"))],
    )
    broker = broker_factory(broker_dir, BrokerTLS(files.broker_cert, files.broker_key, files.broker_ca))
    hub_side = broker.probe(username="edgepack-hub", password="hub-pw", tls_ca=files.ca_cert)
    device = broker.probe(username="dev-a", password="pw-a", tls_ca=files.ca_cert)
    try:
        assert hub_side.subscribe("tls/devices/+/online") == [1]
        device.publish("tls/devices/dev-a/online", b"true")
        assert hub_side.expect(lambda m: True).payload == b"true"
    finally:
        device.close()
        hub_side.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        broker.probe(username="dev-a", password="pw-a", tls_ca=_other_ca(tmp_path))
    with pytest.raises((RuntimeError, ConnectionError)):
        MqttProbe.connect(broker.host, broker.port, username="dev-a", password="pw-a", timeout=3)  # plain


def test_hub_over_https_hands_devices_the_ca_and_publishes_over_tls(
    tmp_path: Path, hub: HubFactory, publisher: Publisher, broker_factory: BrokerFactory
) -> None:
    files, broker_dir = _material(tmp_path)
    h0 = HubSettings(data_dir=tmp_path / "hub", broker_dir=broker_dir)
    write_broker_files(broker_dir, prefix="x", hub=BrokerUser("edgepack-hub", "unused"), devices=[])
    broker = broker_factory(broker_dir, BrokerTLS(files.broker_cert, files.broker_key, files.broker_ca))
    h = hub(
        data_dir=h0.data_dir,
        ca=files.ca_cert,
        tls_cert=files.hub_cert,
        tls_key=files.hub_key,
        mqtt_host="127.0.0.1",
        mqtt_port=broker.port,
        mqtt_tls_ca=files.ca_cert,
        broker_dir=broker_dir,
        broker_pid_file=broker.pid_file,
        topic_prefix="tlsfleet",
    )
    assert h.url.startswith("https://")
    module = push(h, publisher, "tls-mod", "1")
    with h.client() as http:
        r = http.post("/api/v1/devices", json={"id": "dev-t", "tags": {}})
        assert r.status_code == 201, r.text
        creds = DeviceCredentials.model_validate(r.json()["device_credentials"])
        assert deploy(http, "tls-svc", module, devices=["dev-t"]).status_code == 201
    assert creds.hub_url.startswith("https://") and creds.mqtt.tls
    assert creds.ca_pem == files.ca_cert.read_text()
    # The device trusts exactly the CA it was given, for the broker and for the hub.
    ca_file = tmp_path / "device-ca.pem"
    ca_file.write_text(creds.ca_pem or "")
    device = broker.probe(username=creds.mqtt.username, password=creds.mqtt.password, tls_ca=ca_file)
    try:
        assert device.subscribe("tlsfleet/devices/dev-t/desired") == [1]
        desired = device.expect(lambda m: m.topic.endswith("/desired"))
        assert b"tls-svc" in desired.payload
    finally:
        device.close()
    got = httpx.get(
        creds.hub_url + "/api/v1/device/desired",
        headers={"Authorization": f"Bearer {creds.token}"},
        verify=ssl.create_default_context(cafile=str(ca_file)),
    )
    assert got.status_code == 200 and got.content == desired.payload
    wrong = ssl.create_default_context(cafile=str(_other_ca(tmp_path)))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(h.url + "/api/v1/hub/key", verify=wrong)

    # The CLI verifies the hub too: with its CA it logs in, without it (or with another) it
    # refuses, saying what to pass.
    home = tmp_path / "home"
    env = {k: v for k, v in env_for(home, h).items() if k not in ("EDGEPACK_HUB_URL", "EDGEPACK_TOKEN")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EDGEPACK, *args], env=env, capture_output=True, text=True, timeout=120)

    assert "--ca" in one_line_error(cli("login", "--hub", h.url, "--token", h.admin_token), 4)
    assert "--ca" in one_line_error(
        cli("login", "--hub", h.url, "--token", h.admin_token, "--ca", str(_other_ca(tmp_path))), 4
    )
    ok = cli("login", "--hub", h.url, "--token", h.admin_token, "--ca", str(files.ca_cert))
    assert ok.returncode == 0, ok.stderr
    listed = cli("device", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [d["id"] for d in json.loads(listed.stdout)] == ["dev-t"]


def test_plain_http_beyond_loopback_is_refused_unless_asked_for(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain HTTP"):
        with_default_tls(HubSettings(data_dir=tmp_path / "a", host="0.0.0.0"))
    assert with_default_tls(HubSettings(data_dir=tmp_path / "a", host="0.0.0.0", allow_plain_http=True))
    assert with_default_tls(HubSettings(data_dir=tmp_path / "a", host="127.0.0.1")).tls_cert is None
    # Once broker-config --tls made the hub's certificate, the hub uses it by default.
    files, _ = _material(tmp_path)
    chosen = with_default_tls(HubSettings(data_dir=tmp_path / "hub", host="0.0.0.0"))
    assert chosen.tls_cert == files.hub_cert and chosen.base_url().startswith("https://")
    env = {**os.environ, "EDGEPACK_HUB_ADMIN_TOKEN": "x" * 20}
    served = subprocess.run(
        [EDGEPACK, "hub", "serve", "--data-dir", str(tmp_path / "b"), "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert served.returncode == 2 and "plain HTTP" in served.stderr, served.stderr


def test_broker_config_tls_generates_a_config_mosquitto_serves_tls_with(tmp_path: Path) -> None:
    data, out = tmp_path / "hub", tmp_path / "broker"
    port = free_port()
    made = subprocess.run(
        [
            EDGEPACK,
            "hub",
            "broker-config",
            "--out",
            str(out),
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--tls",
            "--topic-prefix",
            "gen",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    conf = (out / "mosquitto.conf").read_text()
    assert "certfile" in conf and "tls_version tlsv1.2" in conf
    assert (data / "tls" / "ca.crt").is_file() and (data / "tls" / "hub.crt").is_file()
    assert oct((data / "tls" / "ca.key").stat().st_mode & 0o777) == "0o600"
    broker = start_mosquitto(tmp_path / "run", lambda _port: conf, port=port)
    try:
        password = (data / "mqtt_password").read_text().strip()
        probe = broker.probe(username="edgepack-hub", password=password, tls_ca=data / "tls" / "ca.crt")
        assert probe.subscribe("gen/devices/+/reported") == [1]
        probe.close()
    finally:
        broker.stop()
    assert MOSQUITTO.exists()
