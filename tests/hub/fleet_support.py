"""What the fleet tests share: pushing forged modules, enrolling, deploying, verifying states."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from manifests.desired import DesiredState, verify_desired
from manifests.signing import TrustStore, load_public_key
from tests.conftest import Publisher
from tests.factory import Forge, ModuleParts, default_files
from tests.hub.conftest import RunningHub


@dataclass
class PushedModule:
    name: str
    version: str
    parts: ModuleParts

    @property
    def digest(self) -> str:
        return self.parts.manifest_digest

    @property
    def blob_digests(self) -> list[str]:
        return sorted(self.parts.blobs)


def push(hub: RunningHub, publisher: Publisher, name: str, version: str, factor: int = 2) -> PushedModule:
    """Push a small signed module whose model differs by ``factor`` (so blobs differ too)."""
    forge = Forge(publisher=publisher.key)
    files = default_files(factor)
    bundle = forge.bundle(files=files, name=name, version=version)
    with hub.client() as http:
        r = http.post("/api/v1/modules", content=bundle)
    assert r.status_code in (200, 201), r.text
    parts = forge.module(files=files, name=name, version=version)
    return PushedModule(name, version, parts)


@dataclass
class Enrolled:
    id: str
    token: str
    mqtt_password: str
    generation: int


def enroll(http: httpx.Client, device_id: str, **tags: str) -> Enrolled:
    r = http.post("/api/v1/devices", json={"id": device_id, "tags": tags})
    assert r.status_code == 201, r.text
    body = r.json()
    return Enrolled(
        device_id,
        body["credentials"]["token"],
        body["credentials"]["mqtt_password"],
        body["device"]["generation"],
    )


def deploy(
    http: httpx.Client,
    name: str,
    module: PushedModule,
    *,
    port: int = 8890,
    selector: str | None = None,
    devices: list[str] | None = None,
) -> httpx.Response:
    target: dict[str, Any] = {"selector": selector} if selector is not None else {"devices": devices}
    return http.put(
        f"/api/v1/deployments/{name}",
        json={
            "module": module.name,
            "version": module.version,
            "deployment_config": {"computeType": "local", "port": port},
            "target": target,
        },
    )


def hub_trust(hub: RunningHub) -> TrustStore:
    """The trust store a device builds from the hub's public key endpoint (no auth)."""
    r = httpx.get(f"{hub.url}/api/v1/hub/key")
    assert r.status_code == 200, r.text
    key = load_public_key(r.json()["public_key"].encode())
    return TrustStore().with_key(key, name="hub")


def verified_state(
    payload: bytes, trust: TrustStore, device_id: str, applied_generation: int = 0
) -> DesiredState:
    """Check a desired state the way an agent does (``manifests.desired.verify_desired``)."""
    return verify_desired(
        payload,
        hub_trust=trust,
        device_id=device_id,
        applied_generation=applied_generation,
        now=datetime.now(UTC),
    )


def desired_over_http(hub: RunningHub, token: str) -> bytes:
    with hub.client(token=token) as http:
        r = http.get("/api/v1/device/desired")
    assert r.status_code == 200, r.text
    return r.content
