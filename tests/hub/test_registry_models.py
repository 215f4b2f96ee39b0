"""The model registry over real HTTP: versions, tags, downloads, deletes, concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from cloud_hub.registry.tags import matches, parse_filters, parse_tags
from manifests.canonical import canonical_json
from manifests.digests import sha256_digest
from manifests.errors import ConfigError
from manifests.module import model_tags
from tests.factory import Forge
from tests.hub.blob_support import leave_a_crashed_upload, leftovers
from tests.hub.conftest import HubFactory
from tests.hub.test_registry_modules import add_deployment, push, stored_blobs

pytestmark = pytest.mark.both_blob_stores


def register(client: httpx.Client, name: str, files: dict[str, bytes], **fields: Any) -> httpx.Response:
    """What the CLI does: upload each blob the hub lacks, then register the file list."""
    for data in files.values():
        digest = sha256_digest(data)
        if client.head(f"/api/v1/blobs/{digest}").status_code == 404:
            put = client.put(f"/api/v1/blobs/{digest}", content=data)
            assert put.status_code == 201, put.text
    listing = [{"path": p, "digest": sha256_digest(d), "size": len(d)} for p, d in files.items()]
    return client.post(f"/api/v1/models/{name}/versions", json={"files": listing, **fields})


def test_versions_count_up_and_carry_tags_description_and_properties(hub: HubFactory) -> None:
    running = hub()
    with running.client() as client:
        one = register(client, "digits", {"digits.onnx": b"v1"}, tags={"framework": "onnx"})
        two = register(
            client,
            "digits",
            {"digits.onnx": b"v2"},
            tags={"framework": "onnx", "stage": "prod"},
            description="retrained",
            properties={"accuracy": 0.97},
        )
        assert (one.status_code, two.status_code) == (201, 201), one.text + two.text
        assert (one.json()["version"], two.json()["version"]) == (1, 2)

        latest = client.get("/api/v1/models/digits/versions/latest").json()
        assert latest["version"] == 2
        assert latest["description"] == "retrained" and latest["properties"] == {"accuracy": 0.97}
        assert latest["files"] == [{"path": "digits.onnx", "digest": sha256_digest(b"v2"), "size": 2}]

        prod = client.get("/api/v1/models", params={"tag": ["stage=prod"]}).json()
        assert [(m["name"], m["version"]) for m in prod] == [("digits", 2)]
        onnx = client.get("/api/v1/models", params={"tag": ["framework"]}).json()
        assert [m["version"] for m in onnx] == [1, 2]
        assert client.get("/api/v1/models", params={"tag": ["stage=dev"]}).json() == []
        only_latest = client.get("/api/v1/models", params={"latest": True}).json()
        assert [m["version"] for m in only_latest] == [2]


def test_tags_description_and_properties_can_change_but_files_cannot(hub: HubFactory) -> None:
    running = hub()
    with running.client() as client:
        register(
            client, "digits", {"m.onnx": b"m"}, tags={"stage": "dev", "team": "a"}, properties={"acc": 0.9}
        )
        patch = {
            "set_tags": {"stage": "prod"},
            "remove_tags": ["team"],
            "properties": {"f1": 0.8},
            "description": "ok",
        }
        changed = client.patch("/api/v1/models/digits/versions/1", json=patch)
        assert changed.status_code == 200, changed.text
        shown = client.get("/api/v1/models/digits/versions/1").json()
        assert shown["tags"] == {"stage": "prod"}
        assert shown["properties"] == {"acc": 0.9, "f1": 0.8} and shown["description"] == "ok"
        assert [f["path"] for f in shown["files"]] == ["m.onnx"]
        assert client.patch("/api/v1/models/digits/versions/2", json=patch).status_code == 404
        bad = client.patch("/api/v1/models/digits/versions/1", json={"set_tags": {"bad key": "x"}})
        assert bad.status_code == 400 and "bad key" in bad.json()["error"]["message"]
        assert client.patch("/api/v1/models/digits/versions/1", json={"files": []}).status_code == 422


def test_a_folder_model_is_downloaded_file_by_file(hub: HubFactory) -> None:
    running = hub()
    files = {"resnet/model.onnx": b"weights" * 1000, "resnet/labels.txt": b"cat\ndog\n"}
    with running.client() as client:
        version = register(client, "resnet", files).json()["version"]
        for path, data in files.items():
            got = client.get(f"/api/v1/models/resnet/versions/{version}/files/{path}")
            assert got.status_code == 200 and got.content == data
        part = client.get(
            "/api/v1/models/resnet/versions/1/files/resnet/model.onnx", headers={"Range": "bytes=0-6"}
        )
        assert part.status_code == 206 and part.content == b"weights"
        assert client.get("/api/v1/models/resnet/versions/1/files/resnet/nope").status_code == 404


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/models/ghost/versions/1", "'ghost' is not registered"),
        ("/models/digits/versions/7", "known versions: 1"),
        ("/models/digits/versions", None),
        ("/models/ghost/versions", "'ghost' is not registered"),
    ],
)
def test_unknown_models_and_versions_are_404(hub: HubFactory, path: str, reason: str | None) -> None:
    running = hub()
    with running.client() as client:
        register(client, "digits", {"m.onnx": b"m"})
        response = client.get("/api/v1" + path)
    if reason is None:
        assert response.status_code == 200
    else:
        assert response.status_code == 404
        assert reason in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"files": [{"path": "../x", "digest": "sha256:" + "0" * 64, "size": 1}]}, 400, "unsafe path"),
        ({"files": [{"path": "m", "digest": "sha256:" + "0" * 64, "size": 1}]}, 400, "upload it first"),
        ({"files": []}, 422, "files"),
        ({"files": [{"path": "m", "digest": "md5:1", "size": 1}]}, 400, "not a blob digest"),
    ],
)
def test_bad_registrations_name_the_problem(
    hub: HubFactory, body: dict[str, Any], status: int, reason: str
) -> None:
    running = hub()
    with running.client() as client:
        response = client.post("/api/v1/models/digits/versions", json=body)
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["message"]


def test_a_blob_upload_is_checked_against_its_digest_and_size_limit(hub: HubFactory) -> None:
    running = hub(max_upload_mb=1)
    with running.client() as client:
        wrong = client.put(f"/api/v1/blobs/{sha256_digest(b'expected')}", content=b"something else")
        assert wrong.status_code == 422 and "upload it again" in wrong.json()["error"]["message"]
        big = b"x" * (1024 * 1024 + 1)
        too_big = client.put(f"/api/v1/blobs/{sha256_digest(big)}", content=big)
        assert too_big.status_code == 413
        streamed = client.put(
            f"/api/v1/blobs/{sha256_digest(big)}", content=iter([big[:600_000], big[600_000:]])
        )
        assert streamed.status_code == 413
        ok = client.put(f"/api/v1/blobs/{sha256_digest(b'fine')}", content=b"fine")
        assert ok.status_code == 201 and ok.json() == {
            "digest": sha256_digest(b"fine"),
            "size": 4,
            "created": True,
        }
        again = client.put(f"/api/v1/blobs/{sha256_digest(b'fine')}", content=b"fine")
        assert again.status_code == 200 and again.json()["created"] is False
    assert stored_blobs(running) == {sha256_digest(b"fine")}


def test_concurrent_registrations_get_distinct_consecutive_versions(hub: HubFactory) -> None:
    running = hub()
    with running.client() as client:
        register(client, "seed", {"shared.onnx": b"shared"})

        def one(i: int) -> int:
            response = register(client, "digits", {"shared.onnx": b"shared"}, tags={"run": str(i)})
            assert response.status_code == 201, response.text
            return int(response.json()["version"])

        with ThreadPoolExecutor(max_workers=8) as pool:
            versions = list(pool.map(one, range(24)))
        assert sorted(versions) == list(range(1, 25))
        listed = client.get("/api/v1/models/digits/versions").json()
        assert sorted(int(m["tags"]["run"]) for m in listed) == list(range(24))
    assert stored_blobs(running) == {sha256_digest(b"shared")}


def test_deleted_versions_are_not_reused_and_shared_blobs_stay(hub: HubFactory) -> None:
    running = hub()
    with running.client() as client:
        register(client, "digits", {"m.onnx": b"one"})
        register(client, "digits", {"m.onnx": b"two"})
        register(client, "other", {"m.onnx": b"two"})
        gone = client.delete("/api/v1/models/digits/versions/2")
        assert gone.status_code == 200 and gone.json()["freed_blobs"] == []  # 'other' still uses it
        assert client.get("/api/v1/models/digits/versions/2").status_code == 404
        assert register(client, "digits", {"m.onnx": b"three"}).json()["version"] == 3
        freed = client.delete("/api/v1/models/digits/versions/1").json()["freed_blobs"]
        assert freed == [sha256_digest(b"one")]
        assert client.delete("/api/v1/models/digits/versions/latest").status_code == 400
    assert stored_blobs(running) == {sha256_digest(b"two"), sha256_digest(b"three")}


def test_a_model_a_deployed_module_was_built_from_cannot_be_deleted(hub: HubFactory, forge: Forge) -> None:
    running = hub()
    weights = canonical_json({"factor": 5})
    files = {"src/score.py": b"#\n", "model/model.json": weights}
    with running.client() as client:
        register(client, "factor", {"model.json": weights})
        register(client, "twin", {"model.json": weights})  # the same bytes, another model
        module = push(client, forge.bundle(name="scaler", files=files, tags=model_tags(["factor:1"])))
        add_deployment(running, "scaler-berlin", module.json())
        add_deployment(running, "scaler-paris", module.json())
        # A module that holds the same bytes but was not built from a registered model.
        local = push(client, forge.bundle(name="local", files=files))
        add_deployment(running, "local-munich", local.json())
        refused = client.delete("/api/v1/models/factor/versions/1")
        assert refused.status_code == 409
        message = refused.json()["error"]["message"]
        assert "'scaler-berlin'" in message and "'scaler-paris'" in message
        assert "local-munich" not in message
        assert client.get("/api/v1/models/factor/versions/1").status_code == 200

        # Byte-identical files in other services' modules do not make the twin used; its
        # delete frees no blob those modules hold.
        gone = client.delete("/api/v1/models/twin/versions/1")
        assert gone.status_code == 200, gone.text
        assert gone.json()["freed_blobs"] == []
        assert client.get(f"/api/v1/blobs/{sha256_digest(weights)}").status_code == 200


@pytest.mark.parametrize(
    ("tags", "filters", "expected"),
    [
        ({"a": "1"}, {}, True),
        ({"a": "1"}, {"a": "1"}, True),
        ({"a": "1"}, {"a": "2"}, False),
        ({"a": "1"}, {"a": None}, True),
        ({"a": "1"}, {"b": None}, False),
        ({"a": "1", "b": ""}, {"a": "1", "b": ""}, True),
    ],
)
def test_tag_matching(tags: dict[str, str], filters: dict[str, str | None], expected: bool) -> None:
    assert matches(tags, filters) is expected


def test_tag_parsing() -> None:
    assert parse_tags(["framework=onnx", "note=a=b", "empty="]) == {
        "framework": "onnx",
        "note": "a=b",
        "empty": "",
    }
    assert parse_filters(["stage=prod", "gpu"]) == {"stage": "prod", "gpu": None}
    for bad in (["novalue"], ["=x"], ["sp ace=1"], ["a=1", "a=2"]):
        with pytest.raises(ConfigError):
            parse_tags(bad)


def test_garbage_collection_frees_only_unused_blobs_past_the_grace_period(hub: HubFactory) -> None:
    running = hub()
    with running.client() as client:
        register(client, "digits", {"m.onnx": b"kept"})
        assert client.put(f"/api/v1/blobs/{sha256_digest(b'orphan')}", content=b"orphan").status_code == 201
        leave_a_crashed_upload(running.core.blobs)

        recent = client.post("/api/v1/registry/gc", params={"grace_s": 3600})
        assert recent.status_code == 200 and recent.json()["freed_blobs"] == []
        assert stored_blobs(running) == {sha256_digest(b"kept"), sha256_digest(b"orphan")}

        now = client.post("/api/v1/registry/gc", params={"grace_s": 0}).json()
        assert now["freed_blobs"] == [sha256_digest(b"orphan")]
    assert stored_blobs(running) == {sha256_digest(b"kept")}
    assert leftovers(running.core.blobs) == []
