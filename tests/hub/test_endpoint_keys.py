"""Issue 8, finding 9: ``authEnabled`` and ``sslEnabled`` in deploymentconfig.json were parsed
and then ignored, so an Azure user who asked for an authenticated or TLS endpoint got an open,
plain one. Now the hub makes a primary and a secondary key per service, signs only their
hashes into the desired state, and the scoring server (configured the way the agent does it,
from that desired state) refuses a request without a key and accepts either key."""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from manifests.desired import DeploymentSettings
from tests.conftest import Publisher, free_port
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import Enrolled, desired_over_http, enroll, hub_trust, push, verified_state
from tests.hub.test_fleet_cli import ok_json, one_line_error, run
from tests.test_scoring_server import make_module, serving, wait_ready

SCRIPT = "def init():\n    pass\n\n\ndef run(raw_data):\n    return {'ok': True}\n"


def _deploy(h: RunningHub, config: dict[str, object]) -> httpx.Response:
    with h.client() as http:
        return http.put(
            "/api/v1/deployments/keyed",
            json={
                "module": "keyed-mod",
                "version": "1",
                "deployment_config": {"computeType": "local", "port": 8123, **config},
                "target": {"devices": ["dev-k"]},
            },
        )


def _settings_on_device(h: RunningHub, device: Enrolled, applied: int = 0) -> tuple[DeploymentSettings, int]:
    state = verified_state(desired_over_http(h, device.token), hub_trust(h), device.id, applied)
    [module] = state.modules
    return module.settings, state.generation


def _write_keys_file(path: Path, settings: DeploymentSettings) -> None:
    """What the agent does with a desired state's auth: the hashes, into the server's file."""
    assert settings.auth is not None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"sha256": settings.auth.key_sha256}))
    os.replace(tmp, path)


def test_an_auth_enabled_service_refuses_calls_without_a_key_and_takes_either_key(
    hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    h = hub()
    push(h, publisher, "keyed-mod", "1")
    with h.client() as http:
        device = enroll(http, "dev-k")
    r = _deploy(h, {"authEnabled": True, "location": "westeurope"})
    assert r.status_code == 201, r.text
    assert any("location" in w for w in r.json()["warnings"]), r.json()["warnings"]
    with h.client() as http:
        keys = http.get("/api/v1/deployments/keyed/keys").json()
    primary, secondary = keys["primary"], keys["secondary"]
    assert primary != secondary and len(primary) >= 32

    settings, generation = _settings_on_device(h, device)
    desired_text = desired_over_http(h, device.token).decode()
    assert primary not in desired_text and secondary not in desired_text  # only hashes travel

    keys_file = tmp_path / "keys.json"
    _write_keys_file(keys_file, settings)
    module = make_module(tmp_path / "mod", SCRIPT, {"m.bin": b"x"})
    with serving(module, env={"EDGEPACK_AUTH_KEYS_FILE": str(keys_file)}) as server:
        wait_ready(server)
        score = server.url + "/score"
        assert httpx.post(score, json={}).status_code == 401
        assert httpx.post(score, json={}, headers={"Authorization": "Bearer wrong-key"}).status_code == 401
        for key in (primary, secondary):
            r = httpx.post(score, json={}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text

        # Regenerating the primary key re-issues the device's desired state; the agent writes
        # the new hashes and the running server switches, the secondary working throughout.
        with h.client() as http:
            r = http.post("/api/v1/deployments/keyed/keys/regenerate", json={"key": "primary"})
        assert r.status_code == 200, r.text
        new_primary = r.json()["keys"]["primary"]
        assert r.json()["keys"]["secondary"] == secondary and new_primary != primary
        settings, newer = _settings_on_device(h, device, generation)
        assert newer > generation
        _write_keys_file(keys_file, settings)
        deadline = time.monotonic() + 10
        while httpx.post(score, json={}, headers={"Authorization": f"Bearer {primary}"}).status_code != 401:
            assert time.monotonic() < deadline, "the old primary key is still accepted"
            time.sleep(0.2)
        for key in (new_primary, secondary):
            assert httpx.post(score, json={}, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_keys_given_in_the_config_are_used_and_ssl_enabled_reaches_the_device(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub()
    push(h, publisher, "keyed-mod", "1")
    with h.client() as http:
        device = enroll(http, "dev-k")
    given = {"primaryKey": "p" * 20, "secondaryKey": "s" * 20}
    # The body limits of the edgepack object travel with the others (docs/security.md §7).
    bodies = {"maxBodyBytes": 2_000_000, "maxBodyBytesInFlight": 5_000_000}
    config = {"authEnabled": True, "sslEnabled": True, "keys": given, "scoringTimeoutMs": 5000}
    r = _deploy(h, {**config, "edgepack": bodies})
    assert r.status_code == 201, r.text
    with h.client() as http:
        shown = http.get("/api/v1/deployments/keyed/keys").json()
    assert shown == {"primary": given["primaryKey"], "secondary": given["secondaryKey"]}
    settings, _ = _settings_on_device(h, device)
    assert settings.tls is not None and settings.auth is not None
    assert settings.limits.run_timeout_s == 5.0
    limits = settings.limits
    assert (limits.max_body_bytes, limits.max_body_bytes_in_flight) == (2_000_000, 5_000_000)
    # Deployed again without authEnabled: the endpoint is open again and its keys are gone.
    assert _deploy(h, {}).status_code == 200
    settings, _ = _settings_on_device(h, device)
    assert settings.auth is None and settings.tls is None
    with h.client() as http:
        assert http.get("/api/v1/deployments/keyed/keys").status_code == 404


def test_the_cli_shows_and_rotates_keys_warns_at_deploy_and_calls_with_a_key(
    hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    h = hub()
    push(h, publisher, "keyed-mod", "1")
    home = tmp_path / "home"
    with h.client() as http:
        device = enroll(http, "dev-k")
    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(json.dumps({"computeType": "ACI", "port": 8123, "authEnabled": True, "dnsNameLabel": "x"}))
    deployed = run(
        home, h, "deploy", "-n", "keyed", "-m", "keyed-mod:1", "--dc", str(dc), "--target", "device:dev-k"
    )
    assert deployed.returncode == 0, deployed.stderr
    assert "warning:" in deployed.stderr and "dnsNameLabel" in deployed.stderr
    keys = ok_json(run(home, h, "service", "keys", "keyed", "--json"))
    shown = run(home, h, "service", "keys", "keyed")
    assert keys["primary"] in shown.stdout and keys["secondary"] in shown.stdout
    rotated = ok_json(run(home, h, "service", "keys", "keyed", "--regenerate", "secondary", "--json"))
    assert rotated["keys"]["primary"] == keys["primary"] and rotated["keys"]["secondary"] != keys["secondary"]
    assert rotated["issued"] == {"dev-k": rotated["issued"]["dev-k"]}
    one_line_error(run(home, h, "service", "keys", "keyed", "--regenerate", "tertiary"), 2)

    settings, _ = _settings_on_device(h, device)
    keys_file = tmp_path / "keys.json"
    _write_keys_file(keys_file, settings)
    module = make_module(tmp_path / "mod", SCRIPT, {"m.bin": b"x"})
    with serving(module, env={"EDGEPACK_AUTH_KEYS_FILE": str(keys_file)}) as server:
        wait_ready(server)
        refused = run(home, h, "call", server.url, "--data", "{}")
        assert refused.returncode == 4 and "401" in refused.stderr
        answered = run(home, h, "call", server.url, "--data", "{}", "--key", rotated["keys"]["secondary"])
        assert answered.returncode == 0, answered.stderr
        assert json.loads(answered.stdout) == {"ok": True}


def _csr(key: ec.EllipticCurvePrivateKey, *names: str) -> str:
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_an_ssl_enabled_service_gets_a_certificate_from_the_endpoint_ca_and_serves_https(
    hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    h = hub()
    push(h, publisher, "keyed-mod", "1")
    with h.client() as http:
        device = enroll(http, "dev-k")
    assert _deploy(h, {"sslEnabled": True}).status_code == 201
    # As the agent: a key made on the device, a request for the device's own names.
    key = ec.generate_private_key(ec.SECP256R1())
    with h.client(token=device.token) as http:
        r = http.post(
            "/api/v1/device/certificates",
            json={"service": "keyed", "csr_pem": _csr(key, "dev-k.local", "127.0.0.1")},
        )
        assert r.status_code == 201, r.text
        issued = r.json()
        stolen = http.post(
            "/api/v1/device/certificates", json={"service": "keyed", "csr_pem": _csr(key, "dev-other.local")}
        )
        assert stolen.status_code == 400 and "may not use" in stolen.json()["error"]["message"]
        unknown = http.post(
            "/api/v1/device/certificates", json={"service": "nope", "csr_pem": _csr(key, "dev-k")}
        )
        assert unknown.status_code == 404
    endpoint_ca = httpx.get(h.url + "/api/v1/hub/endpoint-ca")
    assert endpoint_ca.status_code == 200 and endpoint_ca.text == issued["ca_pem"]

    cert, key_file, ca_file = tmp_path / "svc.crt", tmp_path / "svc.key", tmp_path / "endpoint-ca.crt"
    cert.write_text(issued["cert_pem"])
    pkcs8 = serialization.PrivateFormat.PKCS8
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    ca_file.write_text(issued["ca_pem"])
    module = make_module(tmp_path / "mod", SCRIPT, {"m.bin": b"x"})
    port = free_port()
    command = [sys.executable, "-m", "edge_agent.scoring", "--module-dir", str(module), "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--tls-cert", str(cert), "--tls-key", str(key_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        verify = ssl.create_default_context(cafile=str(ca_file))
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.post(f"https://127.0.0.1:{port}/score", json={}, verify=verify, timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert r.status_code in (200, 503)  # 503 while init() runs
    finally:
        proc.terminate()
        proc.wait(timeout=20)
