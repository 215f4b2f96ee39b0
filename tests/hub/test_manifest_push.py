"""Registering a module from its signed manifest over blobs uploaded beforehand (what the SDK's
``Model.deploy`` does so that the hub's model files are never sent again)."""

from __future__ import annotations

import httpx

from manifests.digests import sha256_digest
from manifests.signing import envelope_bytes, sign_payload
from tests.factory import Forge
from tests.hub.conftest import HubFactory

MANIFEST = {"Content-Type": "application/vnd.edgepack.manifest+json"}


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    return message


def test_a_manifest_registers_once_its_blobs_are_there(hub: HubFactory, forge: Forge) -> None:
    h = hub()
    parts = forge.module(name="digits", version="1")
    model = parts.blobs[parts.manifest.files[0].digest]  # model/model.json
    with h.client() as http:
        # No blob uploaded: refused, naming a missing blob, and nothing registered.
        message = error_of(http.post("/api/v1/modules", content=parts.manifest_bytes, headers=MANIFEST), 409)
        assert "is not on the hub" in message and "PUT /api/v1/blobs/" in message
        for digest, data in parts.blobs.items():
            assert http.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
        r = http.post("/api/v1/modules", content=parts.manifest_bytes, headers=MANIFEST)
        assert r.status_code == 201, r.text
        body = r.json()
        assert (body["name"], body["version"], body["created"]) == ("digits", "1", True)
        assert body["manifest_digest"] == parts.manifest_digest and body["reused_blobs"] == 2
        again = http.post("/api/v1/modules", content=parts.manifest_bytes, headers=MANIFEST)
        assert again.status_code == 200 and again.json()["created"] is False
        # What a device fetches is the very manifest that was signed.
        served = http.get("/api/v1/modules/digits/versions/1/manifest").content
        assert sha256_digest(served) == parts.manifest_digest

        other = forge.module(name="digits", version="1", files={"src/score.py": b"x", "model/m": model})
        for digest, data in other.blobs.items():
            http.put(f"/api/v1/blobs/{digest}", content=data)
        message = error_of(http.post("/api/v1/modules", content=other.manifest_bytes, headers=MANIFEST), 409)
        assert "already exists with different content" in message


def test_a_manifest_is_refused_as_a_bundle_would_be(hub: HubFactory, forge: Forge) -> None:
    h = hub()
    stranger = forge.module(name="x", version="1", keys=[forge.stranger])
    parts = forge.module(name="y", version="1")
    with h.client() as http:
        for digest, data in {**stranger.blobs, **parts.blobs}.items():
            http.put(f"/api/v1/blobs/{digest}", content=data)
        r = http.post("/api/v1/modules", content=stranger.manifest_bytes, headers=MANIFEST)
        message = error_of(r, 422)
        assert "edgepack hub serve --trust" in message
        # A manifest whose signed size differs from the blob's: a device could never use it.
        lying = parts.manifest.model_copy(
            update={"files": [f.model_copy(update={"size": f.size + 1}) for f in parts.manifest.files]}
        )
        signed = envelope_bytes(sign_payload(lying.payload(), [forge.publisher]))
        message = error_of(http.post("/api/v1/modules", content=signed, headers=MANIFEST), 422)
        assert "the manifest says" in message
        tampered = parts.manifest_bytes.replace(b'"y"', b'"z"')
        assert http.post("/api/v1/modules", content=tampered, headers=MANIFEST).status_code == 422
        assert error_of(http.post("/api/v1/modules", content=b"x" * (5 << 20), headers=MANIFEST), 413)
        assert http.get("/api/v1/modules").json() == []
