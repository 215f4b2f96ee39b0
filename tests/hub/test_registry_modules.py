"""Pushing signed modules to a real hub over real HTTP: verified in full, stored once."""

from __future__ import annotations

import io
import socket
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict
from cloud_hub.fleet.tables import Deployment
from cloud_hub.registry.modules import delete_module, push_module
from manifests.bundle import MANIFEST_NAME
from manifests.canonical import canonical_json
from manifests.digests import sha256_digest
from tests.factory import Defect, Forge
from tests.hub import blob_support
from tests.hub.blob_support import leftovers
from tests.hub.conftest import HubFactory, RunningHub

pytestmark = pytest.mark.both_blob_stores

BUNDLE_TYPE = {"Content-Type": "application/vnd.edgepack.module+tar"}


def stored_blobs(hub: RunningHub) -> set[str]:
    return blob_support.stored_blobs(hub.core.blobs)


def push(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/api/v1/modules", content=data, headers=BUNDLE_TYPE)


def add_deployment(hub: RunningHub, name: str, module: dict[str, str]) -> None:
    """A FLEET deployment row, inserted directly: the registry only reads this table."""
    with hub.core.sessions.begin() as s:
        s.add(
            Deployment(
                name=name,
                module_name=module["name"],
                module_version=module["version"],
                manifest_digest=module["manifest_digest"],
                settings={},
                target={"devices": []},
                created_at=utcnow(),
                updated_at=utcnow(),
            )
        )


def test_a_pushed_bundle_is_listed_and_served_byte_for_byte(hub: HubFactory, digits_bundle: Path) -> None:
    running = hub()
    with tarfile.open(digits_bundle) as tar:
        member = tar.extractfile(MANIFEST_NAME)
        assert member is not None
        manifest_bytes = member.read()
    with running.client() as client:
        first = push(client, digits_bundle.read_bytes())
        assert first.status_code == 201, first.text
        body = first.json()
        assert (body["name"], body["version"], body["created"]) == ("digits", "1", True)
        assert body["manifest_digest"] == sha256_digest(manifest_bytes)
        assert body["new_blobs"] == len({f["digest"] for f in body["files"]}) and body["reused_blobs"] == 0

        again = push(client, digits_bundle.read_bytes())
        assert again.status_code == 200 and again.json()["created"] is False

        listed = client.get("/api/v1/modules").json()
        assert [(m["name"], m["version"]) for m in listed] == [("digits", "1")]
        shown = client.get("/api/v1/modules/digits/versions/1").json()
        assert shown["manifest"]["entry_script"] == "src/score.py"
        assert client.get("/api/v1/modules/digits/versions/1/manifest").content == manifest_bytes
        by_digest = client.get(f"/api/v1/manifests/{body['manifest_digest']}")
        assert by_digest.content == manifest_bytes
        for f in body["files"]:
            blob = client.get(f"/api/v1/blobs/{f['digest']}")
            assert blob.status_code == 200 and sha256_digest(blob.content) == f["digest"]
            assert len(blob.content) == f["size"]


@pytest.mark.parametrize(
    "defect",
    [
        Defect.UNSIGNED,
        Defect.UNTRUSTED_KEY,
        Defect.WRONG_KEY,
        Defect.TAMPERED_MANIFEST,
        Defect.TAMPERED_BYTE,
        Defect.REMOVED_MEMBER,
        Defect.ADDED_MEMBER,
        Defect.DOTDOT_PATH,
        Defect.SYMLINK,
    ],
)
def test_a_refused_push_names_the_reason_and_stores_nothing(
    hub: HubFactory, forge: Forge, defect: Defect
) -> None:
    running = hub()
    with running.client() as client:
        # Two model files, so that some blobs verify before the defect is met.
        files = {"src/score.py": b"def init(): pass\n", "model/a.bin": b"a" * 5000, "model/z.bin": b"z" * 70}
        response = push(client, forge.bundle(defect, files=files))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["type"] == "TrustError"
        assert defect.reason in error["message"]
        assert client.get("/api/v1/modules").json() == []
        assert client.get("/api/v1/modules/demo/versions/1").status_code == 404
    assert stored_blobs(running) == set()
    assert leftovers(running.core.blobs) == []


def test_blobs_shared_between_modules_are_stored_once(hub: HubFactory, forge: Forge) -> None:
    running = hub()
    model = canonical_json({"factor": 3})
    first = {"src/score.py": b"# one\n", "model/model.json": model}
    second = {"src/score.py": b"# two\n", "model/model.json": model}
    with running.client() as client:
        a = push(client, forge.bundle(files=first, name="alpha")).json()
        b = push(client, forge.bundle(files=second, name="beta")).json()
    assert (a["new_blobs"], a["reused_blobs"]) == (2, 0)
    assert (b["new_blobs"], b["reused_blobs"]) == (1, 1)
    assert stored_blobs(running) == {sha256_digest(d) for d in (b"# one\n", b"# two\n", model)}


def test_a_different_module_under_an_existing_version_is_a_conflict(hub: HubFactory, forge: Forge) -> None:
    running = hub()
    with running.client() as client:
        assert push(client, forge.bundle(name="demo", version="1")).status_code == 201
        clash = push(client, forge.bundle(name="demo", version="1", description="other"))
    assert clash.status_code == 409
    assert "demo:1 already exists" in clash.json()["error"]["message"]


def test_unknown_modules_and_blobs_are_404_with_a_json_reason(hub: HubFactory, forge: Forge) -> None:
    running = hub()
    with running.client() as client:
        push(client, forge.bundle(name="demo", version="1"))
        wrong_version = client.get("/api/v1/modules/demo/versions/9")
        assert wrong_version.status_code == 404
        assert "known versions: 1" in wrong_version.json()["error"]["message"]
        unknown = client.get("/api/v1/modules/nothing/versions/1")
        assert unknown.status_code == 404 and "edgepack push" in unknown.json()["error"]["message"]
        missing_blob = client.get("/api/v1/blobs/sha256:" + "0" * 64)
        assert missing_blob.status_code == 404
        assert client.get("/api/v1/blobs/not-a-digest").status_code == 400


def chunked(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_oversized_push_is_413_and_stores_nothing(hub: HubFactory, forge: Forge, declared: bool) -> None:
    running = hub(max_upload_mb=1)
    files = {"src/score.py": b"# big\n", "model/a.bin": b"a" * 600_000, "model/b.bin": b"b" * 600_000}
    data = forge.bundle(files=files)
    with running.client() as client:
        content: bytes | Iterator[bytes] = data if declared else chunked(data)
        response = client.post("/api/v1/modules", content=content, headers=BUNDLE_TYPE)
        assert response.status_code == 413, response.text
        assert "limit of 1 MiB" in response.json()["error"]["message"]
        assert client.get("/api/v1/modules").json() == []
    assert stored_blobs(running) == set()


def test_a_module_in_use_cannot_be_deleted(hub: HubFactory, forge: Forge) -> None:
    running = hub()
    with running.client() as client:
        used = push(client, forge.bundle(name="used")).json()
        spare_files = {"src/score.py": b"#\n", "model/m": b"m"}
        spare = push(client, forge.bundle(name="spare", files=spare_files)).json()
        add_deployment(running, "berlin-scoring", used)

        refused = client.delete("/api/v1/modules/used/versions/1")
        assert refused.status_code == 409
        assert "'berlin-scoring'" in refused.json()["error"]["message"]
        assert client.get("/api/v1/modules/used/versions/1").status_code == 200

        deleted = client.delete("/api/v1/modules/spare/versions/1")
        assert deleted.status_code == 200, deleted.text
        assert sorted(deleted.json()["freed_blobs"]) == sorted(f["digest"] for f in spare["files"])
        assert client.get("/api/v1/modules/spare/versions/1").status_code == 404
    assert stored_blobs(running) == {f["digest"] for f in used["files"]}


def test_every_registry_route_needs_the_admin_token(hub: HubFactory, forge: Forge) -> None:
    running = hub()
    with httpx.Client(base_url=running.url) as anonymous:
        assert anonymous.get("/api/v1/modules").status_code == 401
        assert anonymous.post("/api/v1/modules", content=forge.bundle()).status_code == 401
    with running.client(token="ep_admin_wrong") as wrong:
        assert wrong.get("/api/v1/models").status_code == 401
    with running.client() as client:
        assert client.get("/api/v1/modules").json() == []


def test_byte_ranges_of_a_blob(hub: HubFactory, forge: Forge) -> None:
    running = hub()
    data = bytes(range(256)) * 40
    with running.client() as client:
        pushed = push(client, forge.bundle(files={"src/score.py": b"#\n", "model/m.bin": data})).json()
        digest = next(f["digest"] for f in pushed["files"] if f["path"] == "model/m.bin")
        part = client.get(f"/api/v1/blobs/{digest}", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == data[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
        tail = client.get(f"/api/v1/blobs/{digest}", headers={"Range": "bytes=-10"})
        assert tail.content == data[-10:]
        rest = client.get(f"/api/v1/blobs/{digest}", headers={"Range": "bytes=10000-"})
        assert rest.content == data[10000:]
        assert client.get(f"/api/v1/blobs/{digest}", headers={"Range": "bytes=99999-"}).status_code == 400


def test_a_bundle_pushed_as_a_stream_is_verified_on_the_fly(hub: HubFactory, digits_bundle: Path) -> None:
    running = hub()
    with running.client() as client:
        response = client.post(
            "/api/v1/modules", content=chunked(digits_bundle.read_bytes(), 4096), headers=BUNDLE_TYPE
        )
    assert response.status_code == 201, response.text
    assert response.json()["manifest_digest"].startswith("sha256:")


def test_parallel_pushes_and_deletes_never_leave_a_module_without_its_blobs(
    hub: HubFactory, forge: Forge
) -> None:
    """Pushes that reuse a shared blob race deletes that free it; every listed module keeps
    every blob it names, and each blob is held once."""
    running = hub()
    shared = b"shared weights" * 1000

    def bundle(i: int) -> bytes:
        return forge.bundle(name=f"m{i}", files={"src/score.py": f"# {i}\n".encode(), "model/w.bin": shared})

    bundles = {i: bundle(i) for i in range(12)}

    def push_until_stored(i: int) -> int:
        with running.client() as client:
            for _ in range(20):
                response = push(client, bundles[i])
                if response.status_code != 409:  # 409: the shared blob was freed mid-push; push again
                    return response.status_code
            return 409

    def delete(i: int) -> int:
        with running.client() as client:
            return client.delete(f"/api/v1/modules/m{i}/versions/1").status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        first = list(pool.map(push_until_stored, range(6)))
        assert first == [201] * 6
        # Delete the first six while the next six (and a duplicate of m6) are pushed.
        jobs = [pool.submit(delete, i) for i in range(6)]
        jobs += [pool.submit(push_until_stored, i) for i in (*range(6, 12), 6)]
        results = [j.result() for j in jobs]
    assert results[:6] == [200] * 6
    assert sorted(results[6:]) == [200] + [201] * 6
    with running.client() as client:
        listed = client.get("/api/v1/modules").json()
        assert sorted(m["name"] for m in listed) == sorted(f"m{i}" for i in range(6, 12))
        for m in listed:
            for f in m["files"]:
                blob = client.get(f"/api/v1/blobs/{f['digest']}")
                assert blob.status_code == 200 and sha256_digest(blob.content) == f["digest"]
    expected = {sha256_digest(shared)} | {sha256_digest(f"# {i}\n".encode()) for i in range(6, 12)}
    assert stored_blobs(running) == expected


class _ThenRun(io.RawIOBase):
    """A bundle stream that runs ``action`` once reading has reached its last ``tail`` bytes."""

    def __init__(self, data: bytes, action: Callable[[], object], tail: int) -> None:
        self._data = io.BytesIO(data)
        self._trigger = len(data) - tail
        self._action: Callable[[], object] | None = action

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._data.readinto(buffer)
        if self._data.tell() >= self._trigger and self._action is not None:
            action, self._action = self._action, None
            action()
        return n


def test_a_push_that_relied_on_a_blob_deleted_meanwhile_is_refused_cleanly(
    hub: HubFactory, forge: Forge
) -> None:
    running = hub()
    core = running.core
    shared = b"weights" * 100
    # Blobs travel sorted by digest: pick a large filler that comes after the shared blob, so
    # the shared one has been checked (and skipped, being held) when the filler is being read.
    filler = next(
        data
        for i in range(1000)
        if sha256_digest(data := i.to_bytes(4, "big") * 50_000) > sha256_digest(shared)
    )
    with running.client() as client:
        old = forge.bundle(name="old", files={"src/score.py": b"# old\n", "model/w": shared})
        assert push(client, old).status_code == 201
    second = forge.bundle(
        name="new", files={"src/score.py": b"# new\n", "model/w": shared, "model/z": filler}
    )

    # 'old' is deleted, freeing the shared blob, after the push skipped it and before it commits.
    stream = _ThenRun(second, lambda: delete_module(core.sessions, core.blobs, "old", "1"), tail=50_000)
    with io.BufferedReader(stream) as fh, pytest.raises(Conflict, match="push it again"):
        push_module(core.sessions, core.blobs, core.trust, fh)
    assert not core.blobs.has(sha256_digest(shared))
    with running.client() as client:
        assert client.get("/api/v1/modules").json() == []
        assert push(client, second).status_code == 201  # pushed again: the blob comes back
    assert core.blobs.has(sha256_digest(shared))
    assert stored_blobs(running) == {sha256_digest(d) for d in (b"# new\n", shared, filler)}


def test_an_upload_cut_off_midway_leaves_nothing_behind(hub: HubFactory, forge: Forge) -> None:
    running = hub()
    data = forge.bundle(
        files={"src/score.py": b"#\n", "model/a.bin": b"a" * 300_000, "model/b.bin": b"b" * 300_000}
    )
    host, port = running.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            (
                f"POST /api/v1/modules HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {running.admin_token}\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode()
            + data[: len(data) // 2]
        )
        deadline = time.monotonic() + 20
        while not leftovers(running.core.blobs):  # the hub is staging blobs: now the client vanishes
            assert time.monotonic() < deadline, "the hub never started staging the upload"
            time.sleep(0.01)
    while left := leftovers(running.core.blobs):
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.05)
    assert stored_blobs(running) == set()
    with running.client() as client:
        assert client.get("/api/v1/modules").json() == []
        assert push(client, data).status_code == 201  # and the hub is still fine
