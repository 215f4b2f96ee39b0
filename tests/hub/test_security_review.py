"""Adversarial review of the hub: hostile HTTP requests and hostile MQTT clients.

Each test failed before the fix it comes with. What already held is pinned down in the other
hub tests (device tokens, revocation, ACL between two devices); these cover the gaps found.
"""

from __future__ import annotations

from tests.hub.conftest import HubFactory


def test_identifiers_with_a_trailing_newline_are_refused(hub: HubFactory) -> None:
    # Python's '$' also matches before a final newline: 'dev-c\n' used to pass the device-id
    # check, then blew up signing its desired state (500) and would break the broker's
    # password file for every device after it.
    h = hub()
    with h.client() as http:
        r = http.post("/api/v1/devices", json={"id": "dev-c\n", "tags": {}})
        assert r.status_code == 400, r.text
        assert "device id" in r.json()["error"]["message"]
        assert http.post("/api/v1/devices", json={"id": "dev-c", "tags": {}}).status_code == 201
        r = http.put(
            "/api/v1/deployments/svc%0A",
            json={"module": "m", "version": "1", "settings": {"port": 80}, "target": {"devices": ["dev-c"]}},
        )
        assert r.status_code == 400, r.text
        assert "service name" in r.json()["error"]["message"]
        files = [{"path": "f", "digest": "sha256:" + "0" * 64, "size": 1}]
        r = http.post("/api/v1/models/a%0A/versions", json={"files": files})
        assert r.status_code == 400, r.text
        assert "model name" in r.json()["error"]["message"]
