"""Devices and deployments over real HTTP to a real hub (uvicorn, SQLite file), no broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select

from cloud_hub.fleet.tables import Device, DeviceDesired
from manifests.digests import sha256_digest
from manifests.errors import TrustError
from tests.conftest import Publisher
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import (
    deploy,
    desired_over_http,
    enroll,
    hub_trust,
    push,
    verified_state,
)


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"type", "message"}
    message: str = body["error"]["message"]
    return message


def services_of(hub: RunningHub, token: str) -> list[str]:
    state = verified_state(desired_over_http(hub, token), hub_trust(hub), _device_of(hub, token))
    return [m.service for m in state.modules]


def _device_of(hub: RunningHub, token: str) -> str:
    from cloud_hub.fleet.devices import token_hash

    with hub.core.sessions.begin() as s:
        device_id = s.scalar(select(Device.id).where(Device.token_hash == token_hash(token)))
    assert device_id is not None
    return device_id


def test_hub_key_is_public_and_signs_desired_states(hub: HubFactory) -> None:
    h = hub()
    r = httpx.get(f"{h.url}/api/v1/hub/key")
    assert r.status_code == 200
    assert r.json()["keyid"] == h.core.hub_key_id
    assert "BEGIN PUBLIC KEY" in r.json()["pem"]
    with h.client() as http:
        dev = enroll(http, "edge-1", site="berlin")
    payload = desired_over_http(h, dev.token)
    state = verified_state(payload, hub_trust(h), "edge-1")
    assert (state.generation, state.modules) == (1, [])
    with pytest.raises(TrustError, match="not 'edge-2'"):
        verified_state(payload, hub_trust(h), "edge-2")
    with pytest.raises(TrustError, match="replay"):
        verified_state(payload, hub_trust(h), "edge-1", applied_generation=1)


def test_admin_token_is_required_for_listing_and_changing(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        dev = enroll(http, "edge-1")
    anonymous = httpx.Client(base_url=h.url)
    as_device = h.client(token=dev.token)
    for client in (anonymous, as_device):
        with client:
            for method, path, body in [
                ("GET", "/api/v1/devices", None),
                ("GET", "/api/v1/devices/edge-1", None),
                ("POST", "/api/v1/devices", {"id": "sneaky"}),
                ("PATCH", "/api/v1/devices/edge-1", {"set": {"a": "b"}}),
                ("POST", "/api/v1/devices/edge-1/revoke", None),
                ("GET", "/api/v1/deployments", None),
                ("PUT", "/api/v1/deployments/x", {"module": "m", "version": "1", "target": {}}),
                ("DELETE", "/api/v1/deployments/x", None),
            ]:
                r = client.request(method, path, json=body)
                assert "token" in error_of(r, 401), (method, path)
    with h.client() as http:
        assert [d["id"] for d in http.get("/api/v1/devices").json()["devices"]] == ["edge-1"]


def test_enroll_shows_credentials_once_and_keeps_only_hashes(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        r = http.post("/api/v1/devices", json={"id": "edge-1", "tags": {"site": "berlin"}})
        assert r.status_code == 201
        creds = r.json()["credentials"]
        assert creds["mqtt_username"] == "edge-1"
        shown = http.get("/api/v1/devices/edge-1").json()
        assert shown["tags"] == {"site": "berlin"}
        assert shown["online"] is False and shown["generation"] == 1
        assert creds["token"] not in str(shown) and creds["mqtt_password"] not in str(shown)
        again = http.post("/api/v1/devices", json={"id": "edge-1"})
        assert "already enrolled" in error_of(again, 409)
        bad = http.post("/api/v1/devices", json={"id": "../etc", "tags": {}})
        assert "device id" in error_of(bad, 400)
        bad_tag = http.post("/api/v1/devices", json={"id": "edge-2", "tags": {"site": "a b"}})
        assert "value 'a b'" in error_of(bad_tag, 400)
    with h.core.sessions.begin() as s:
        row = s.get(Device, "edge-1")
        assert row is not None
        assert row.token_hash == sha256_digest(creds["token"].encode()).split(":")[1]
        assert row.mqtt_password_hash.startswith("$7$")
        assert creds["mqtt_password"] not in row.mqtt_password_hash


def test_malformed_selector_is_a_400_naming_it(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        for selector, complaint in [
            ("site=", "value ''"),
            ("site", "key=value"),
            ("site=berlin,,tier=gpu", "stray comma"),
            ("", "empty"),
        ]:
            r = deploy(http, "svc", mod, selector=selector)
            assert complaint in error_of(r, 400), selector
        r = http.get("/api/v1/devices", params={"selector": "site==x"})
        assert "selector" in error_of(r, 400)
        assert error_of(http.get("/api/v1/deployments/svc"), 404)


def test_invalid_deployment_config_is_a_400_naming_the_field(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        enroll(http, "edge-1", site="berlin")
        body = {"module": "digits", "version": "1", "target": {"selector": "site=berlin"}}
        for config, complaints in [
            ({"port": "http"}, ["deploymentconfig.json", "'port'"]),
            ({"prot": 8080}, ["unknown field 'prot'", "did you mean 'port'"]),
            ({"port": 70000}, ["'port'"]),
            ({"containerResourceRequirements": {"cpu": -1}}, ["containerResourceRequirements.cpu"]),
        ]:
            r = http.put("/api/v1/deployments/svc", json={**body, "deployment_config": config})
            message = error_of(r, 400)
            assert all(c in message for c in complaints), message
        r = http.put("/api/v1/deployments/svc", json={**body, "settings": {"port": 0}})
        assert "'port'" in error_of(r, 400)
        r = http.put("/api/v1/deployments/svc", json={**body, "target": {"selecter": "x=y"}})
        assert "selecter" in error_of(r, 400)
        r = http.put("/api/v1/deployments/Bad Name", json={**body, "deployment_config": {}})
        assert "service name" in error_of(r, 400)
        assert deploy(http, "svc", mod, selector="site=berlin").status_code == 201


def test_unknown_module_or_device_is_a_404(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        enroll(http, "edge-1", site="berlin")
        r = http.put(
            "/api/v1/deployments/svc",
            json={"module": "digits", "version": "9", "target": {"devices": ["edge-1"]}},
        )
        message = error_of(r, 404)
        assert "digits:9" in message and "1" in message
        r = http.put(
            "/api/v1/deployments/svc",
            json={"module": "nope", "version": "1", "target": {"devices": ["edge-1"]}},
        )
        assert "nope" in error_of(r, 404)
        assert "ghost" in error_of(deploy(http, "svc", mod, devices=["ghost"]), 404)
        assert "ghost" in error_of(http.get("/api/v1/devices/ghost"), 404)
        assert "svc" in error_of(http.delete("/api/v1/deployments/svc"), 404)
        assert http.get("/api/v1/devices/edge-1").json()["generation"] == 1


def test_port_conflict_is_refused_up_front(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    mod = push(h, publisher, "digits", "1")
    other = push(h, publisher, "other", "1", factor=3)
    with h.client() as http:
        berlin = enroll(http, "b1", site="berlin")
        enroll(http, "m1", site="munich")
        assert deploy(http, "digits", mod, selector="site=berlin", port=8890).status_code == 201
        r = deploy(http, "other", other, devices=["m1", "b1"], port=8890)
        message = error_of(r, 409)
        assert "port 8890" in message and "'b1'" in message
        assert "'digits' and 'other'" in message
        assert error_of(http.get("/api/v1/deployments/other"), 404)
        assert http.get("/api/v1/devices/m1").json()["generation"] == 1
        assert services_of(h, berlin.token) == ["digits"]
        # A retag that would bring two services onto one port is refused the same way.
        assert deploy(http, "other", other, devices=["m1"], port=8890).status_code == 201
        r = http.patch("/api/v1/devices/m1", json={"set": {"site": "berlin"}, "replace": True})
        assert "port 8890" in error_of(r, 409)
        assert http.get("/api/v1/devices/m1").json()["tags"] == {"site": "munich"}
        # Another port is fine, and updating a service does not conflict with itself.
        assert deploy(http, "other", other, devices=["m1", "b1"], port=8891).status_code == 200
        assert deploy(http, "other", other, devices=["m1", "b1"], port=8891).status_code == 200
        assert services_of(h, berlin.token) == ["digits", "other"]


def test_selector_follows_enrolment_and_tags(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        early = enroll(http, "b1", site="berlin", tier="gpu")
        r = deploy(http, "digits", mod, selector="site=berlin,tier=gpu")
        assert r.status_code == 201
        assert r.json()["issued"] == {"b1": 2}
        assert r.json()["published"] is None  # this hub has no broker
        late = enroll(http, "b2", site="berlin", tier="gpu")
        cpu = enroll(http, "b3", site="berlin", tier="cpu")
        assert services_of(h, early.token) == ["digits"]
        assert services_of(h, late.token) == ["digits"]
        assert services_of(h, cpu.token) == []
        shown = http.get("/api/v1/deployments/digits").json()
        assert [d["device_id"] for d in shown["devices"]] == ["b1", "b2"]
        assert shown["state"] == "Transitioning"  # nobody reported yet

        r = http.patch("/api/v1/devices/b2", json={"set": {"tier": "cpu"}})
        assert r.status_code == 200 and r.json()["issued"] == {"b2": 2}
        assert services_of(h, late.token) == []
        r = http.patch("/api/v1/devices/b3", json={"remove": ["tier"], "set": {"tier": "gpu"}})
        assert r.json()["issued"] == {"b3": 2}
        assert services_of(h, cpu.token) == ["digits"]
        # Tags that change nothing the device runs issue no new state.
        assert http.patch("/api/v1/devices/b3", json={"set": {"rack": "7"}}).json()["issued"] == {}
        assert http.get("/api/v1/devices", params={"selector": "tier=gpu"}).json()["devices"][0]["id"] == "b1"

        r = http.delete("/api/v1/deployments/digits")
        assert r.status_code == 200 and sorted(r.json()["issued"]) == ["b1", "b3"]
        assert services_of(h, early.token) == []
        state = verified_state(desired_over_http(h, early.token), hub_trust(h), "b1")
        assert state.generation == 3


@pytest.mark.both_blob_stores
def test_device_token_reads_only_what_its_desired_state_names(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    mine = push(h, publisher, "digits", "1", factor=2)
    theirs = push(h, publisher, "other", "1", factor=5)
    with h.client() as http:
        a = enroll(http, "dev-a")
        b = enroll(http, "dev-b")
        assert deploy(http, "digits", mine, devices=["dev-a"]).status_code == 201
        assert deploy(http, "other", theirs, devices=["dev-b"]).status_code == 201
    model_blob = next(d for d, data in mine.parts.blobs.items() if b"factor" in data)
    with h.client(token=a.token) as dev:
        r = dev.get(f"/api/v1/device/manifests/{mine.digest}")
        assert r.status_code == 200 and r.content == mine.parts.manifest_bytes
        for digest in mine.blob_digests:
            r = dev.get(f"/api/v1/device/blobs/{digest}")
            assert r.status_code == 200 and sha256_digest(r.content) == digest
        whole = mine.parts.blobs[model_blob]
        r = dev.get(f"/api/v1/device/blobs/{model_blob}", headers={"Range": "bytes=2-5"})
        assert r.status_code == 206 and r.content == whole[2:6]
        assert r.headers["content-range"] == f"bytes 2-5/{len(whole)}"
        their_model = next(d for d in theirs.blob_digests if d not in mine.blob_digests)
        assert "desired state" in error_of(dev.get(f"/api/v1/device/manifests/{theirs.digest}"), 403)
        assert "desired state" in error_of(dev.get(f"/api/v1/device/blobs/{their_model}"), 403)
        assert error_of(dev.get("/api/v1/device/blobs/sha256:zz"), 400)
        # The admin API stays closed to a device token.
        assert error_of(dev.get("/api/v1/modules"), 401)
        assert error_of(dev.get(f"/api/v1/blobs/{their_model}"), 401)
    with h.client() as http:
        assert error_of(http.get("/api/v1/device/desired"), 401)  # admin is not a device
        assert http.post("/api/v1/devices/dev-a/revoke").status_code == 200
        assert http.get("/api/v1/devices/dev-a").json()["revoked"] is True
        assert [d["id"] for d in http.get("/api/v1/devices").json()["devices"]] == ["dev-b"]
    with h.client(token=a.token) as dev:
        assert "revoked" in error_of(dev.get("/api/v1/device/desired"), 401)
        assert error_of(dev.get(f"/api/v1/device/blobs/{model_blob}"), 401)
    assert services_of(h, b.token) == ["other"]


def test_reenrolled_device_keeps_rising_generations(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        enroll(http, "edge-1", site="berlin")
        deploy(http, "digits", mod, selector="site=berlin")
        assert http.post("/api/v1/devices/edge-1/revoke").status_code == 200
        again = enroll(http, "edge-1", site="berlin")
    assert again.generation == 3
    state = verified_state(desired_over_http(h, again.token), hub_trust(h), "edge-1")
    assert state.generation == 3 and [m.service for m in state.modules] == ["digits"]


def test_fleet_survives_a_restart(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        dev = enroll(http, "edge-1", site="berlin")
        deploy(http, "digits", mod, selector="site=berlin")
    before = desired_over_http(h, dev.token)
    h2 = h.restart()
    assert desired_over_http(h2, dev.token) == before
    with h2.client() as http:
        assert http.get("/api/v1/deployments/digits").json()["devices"][0]["device_id"] == "edge-1"
        late = enroll(http, "edge-2", site="berlin")
    assert services_of(h2, late.token) == ["digits"]


def test_updating_a_service_reissues_only_on_change(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    v1 = push(h, publisher, "digits", "1", factor=2)
    v2 = push(h, publisher, "digits", "2", factor=3)
    with h.client() as http:
        dev = enroll(http, "edge-1", site="berlin")
        assert deploy(http, "digits", v1, selector="site=berlin").json()["issued"] == {"edge-1": 2}
        same = deploy(http, "digits", v1, selector="site=berlin")
        assert (same.status_code, same.json()["issued"]) == (200, {})
        newer = deploy(http, "digits", v2, selector="site=berlin")
        assert newer.json()["issued"] == {"edge-1": 3}
        assert newer.json()["deployment"]["version"] == "2"
    state = verified_state(desired_over_http(h, dev.token), hub_trust(h), "edge-1")
    assert state.generation == 3 and state.modules[0].manifest_digest == v2.digest
    with h.client(token=dev.token) as device:
        assert device.get(f"/api/v1/device/manifests/{v2.digest}").status_code == 200
        assert error_of(device.get(f"/api/v1/device/manifests/{v1.digest}"), 403)


def _expire_soon(hub: RunningHub, *device_ids: str) -> None:
    with hub.core.sessions.begin() as s:
        for device_id in device_ids:
            row = s.get(DeviceDesired, device_id)
            assert row is not None and row.issued is not None
            row.expires = datetime.now(UTC) + timedelta(minutes=5)


def test_expiring_desired_states_are_renewed_once(hub: HubFactory) -> None:
    h = hub(desired_ttl_s=3600)
    with h.client() as http:
        a = enroll(http, "edge-a")
        enroll(http, "edge-b")
        enroll(http, "edge-c")
    trust = hub_trust(h)
    assert h.process.fleet.renew_expiring() == {}
    with h.client(token=a.token) as dev:
        first = dev.get("/api/v1/device/desired")
        assert first.headers["etag"] == '"1"'
        unchanged = dev.get("/api/v1/device/desired", headers={"If-None-Match": '"1"'})
        assert (unchanged.status_code, unchanged.content) == (304, b"")

    _expire_soon(h, "edge-a")
    renewed = verified_state(desired_over_http(h, a.token), trust, "edge-a")
    assert renewed.generation == 2
    assert renewed.expires - renewed.issued == timedelta(hours=1)
    assert verified_state(desired_over_http(h, a.token), trust, "edge-a").generation == 2
    with h.client(token=a.token) as dev:
        changed = dev.get("/api/v1/device/desired", headers={"If-None-Match": '"1"'})
        assert changed.status_code == 200 and changed.headers["etag"] == '"2"'

    _expire_soon(h, "edge-b", "edge-c")
    assert h.process.fleet.renew_expiring() == {"edge-b": 2, "edge-c": 2}
    assert h.process.fleet.renew_expiring() == {}


def test_openapi_documents_the_fleet_api(hub: HubFactory) -> None:
    h = hub()
    paths = httpx.get(f"{h.url}/openapi.json").json()["paths"]
    for path in (
        "/api/v1/devices",
        "/api/v1/deployments/{name}",
        "/api/v1/device/desired",
        "/api/v1/hub/key",
    ):
        assert path in paths
