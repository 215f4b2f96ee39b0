"""The scaled-out layout with ``download_offload = "nginx"``: the replicas only decide, nginx
sends the blob, from S3 on a presigned GET or from the file store's folder
(cloud_hub.api.downloads, cloud_hub.balancer.nginx).

What must still hold: a device gets only its own module's blobs, ``Range`` works (the agent
resumes with it), the S3 URL never reaches the device and expires, nginx's internal locations
are not reachable from outside, the device's token is not sent to S3, and a file damaged in
the store is still refused.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from cloud_hub.balancer.nginx import Upstream, render_nginx_config
from cloud_hub.core import open_blob_store
from cloud_hub.data.store import FileDataStore, open_data_store
from cloud_hub.settings import HubSettings
from cloud_hub.store.blobs import FileBlobStore
from edge_agent.cache.modules import ModuleCache
from edge_agent.download.module import Counters, FetchControl, fetch_module
from edge_agent.uplink.http import HubHttp
from manifests.device import DeviceCredentials
from manifests.digests import digest_hex, sha256_digest
from manifests.errors import ConfigError
from tests.conftest import Publisher
from tests.factory import Forge, default_files
from tests.hub.replica_fixtures import ReplicaSet, ReplicaSetFactory
from tests.hub.seaweedfs_fixtures import SeaweedFS

pytestmark = pytest.mark.scale_out

BUNDLE = {"Content-Type": "application/vnd.edgepack.module+tar"}
URL_TTL_S = 5


def push(
    rs: ReplicaSet, publisher: Publisher, name: str, factor: int, extra: dict[str, bytes] | None = None
) -> tuple[str, dict[str, bytes]]:
    files = {**default_files(factor), **(extra or {})}
    bundle = Forge(publisher=publisher.key).bundle(files=files, name=name, version="1")
    with rs.client() as http:
        r = http.post("/api/v1/modules", content=bundle, headers=BUNDLE)
        assert r.status_code == 201, r.text
        return str(r.json()["manifest_digest"]), {sha256_digest(data): data for data in files.values()}


def enroll_and_deploy(rs: ReplicaSet, device_id: str, module: str) -> DeviceCredentials:
    with rs.client() as http:
        r = http.post("/api/v1/devices", json={"id": device_id, "tags": {"who": device_id}})
        assert r.status_code == 201, r.text
        body = {"module": module, "version": "1", "settings": {"port": 8890},
                "target": {"selector": f"who={device_id}"}}  # fmt: skip
        assert http.put(f"/api/v1/deployments/{module}", json=body).status_code == 201
        return DeviceCredentials.model_validate(r.json()["device_credentials"])


def test_nginx_sends_blobs_from_s3_and_every_guarantee_holds(
    replica_set: ReplicaSetFactory, publisher: Publisher, seaweedfs: SeaweedFS
) -> None:
    rs = replica_set(2, s3_offload=True, extra_env={"EDGEPACK_HUB_DOWNLOAD_URL_TTL_S": str(URL_TTL_S)})
    mine, my_blobs = push(rs, publisher, "digits", 2)
    _, their_blobs = push(rs, publisher, "other", 5)
    token = enroll_and_deploy(rs, "dev-a", "digits").token
    enroll_and_deploy(rs, "dev-b", "other")
    model = next(d for d, data in my_blobs.items() if b"factor" in data)
    theirs = next(d for d in their_blobs if d not in my_blobs)

    with httpx.Client(base_url=rs.url, headers={"Authorization": f"Bearer {token}"}) as device:
        assert device.get(f"/api/v1/device/manifests/{mine}").status_code == 200
        for digest, data in my_blobs.items():  # through nginx, from either replica
            for _ in rs.replicas:
                r = device.get(f"/api/v1/device/blobs/{digest}")
                assert r.status_code == 200 and r.content == data
                assert "x-accel-redirect" not in r.headers and "X-Amz" not in str(r.url)
        ranged = device.get(f"/api/v1/device/blobs/{model}", headers={"Range": "bytes=2-5"})
        assert ranged.status_code == 206 and ranged.content == my_blobs[model][2:6]
        refused = device.get(f"/api/v1/device/blobs/{theirs}")
        assert refused.status_code == 403 and "desired state" in refused.json()["error"]["message"]
        # nginx's internal location is for the replicas' answers only.
        assert device.get(f"/_edgepack/s3/{seaweedfs.bucket}/anything").status_code == 404
    with httpx.Client(base_url=rs.url) as anonymous:
        assert anonymous.get(f"/api/v1/device/blobs/{model}").status_code == 401

    # What a replica answers nginx: a presigned GET, no bytes; it expires.
    with rs.replicas[0].client(token) as replica:
        answer = replica.get(f"/api/v1/device/blobs/{model}")
    target = answer.headers["x-accel-redirect"]
    assert answer.status_code == 200 and answer.content == b"" and target.startswith("/_edgepack/s3/")
    url = urlsplit(target)
    assert parse_qs(url.query)["X-Amz-Expires"] == [str(URL_TTL_S)]
    direct = f"{seaweedfs.endpoint}{url.path.removeprefix('/_edgepack/s3')}?{url.query}"
    assert httpx.get(direct).content == my_blobs[model]
    time.sleep(URL_TTL_S + 1)
    assert httpx.get(direct).status_code == 403, "a presigned URL past its expiry is refused"
    with httpx.Client(base_url=rs.url, headers={"Authorization": f"Bearer {token}"}) as device:
        # The replicas sign again when half the URL's life is gone: downloads go on.
        assert device.get(f"/api/v1/device/blobs/{model}").content == my_blobs[model]


BIG = os.urandom(3 << 20)


def test_nginx_sends_blobs_from_the_file_store_and_every_guarantee_holds(
    replica_set: ReplicaSetFactory, publisher: Publisher, tmp_path: Path
) -> None:
    rs = replica_set(2, file_offload=True)
    assert rs.blob_dir is not None
    mine, my_blobs = push(rs, publisher, "digits", 2, extra={"model/weights.bin": BIG})
    _, their_blobs = push(rs, publisher, "other", 5)
    creds = enroll_and_deploy(rs, "dev-a", "digits")
    enroll_and_deploy(rs, "dev-b", "other")
    big, theirs = sha256_digest(BIG), next(d for d in their_blobs if d not in my_blobs)
    hex_ = digest_hex(big)

    # The agent's own downloader, through nginx, resuming a blob a killed agent left a third of.
    cache = ModuleCache(tmp_path / "cache")
    partial = cache.blobs.partial_path(big)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(BIG[: len(BIG) // 3])
    counters = Counters()
    http = HubHttp(creds)
    try:
        control = FetchControl(
            cancelled=lambda: False, deadline=time.monotonic() + 60, progress=lambda done, total: None
        )
        installed = fetch_module(http, cache, mine, creds.publishers, control, counters)
    finally:
        http.close()
    small = sum(len(data) for data in my_blobs.values()) - len(BIG)
    assert counters.bytes == len(BIG) - len(BIG) // 3 + small, "only the rest of the big blob came"
    assert (installed.dir / "model" / "weights.bin").read_bytes() == BIG

    with httpx.Client(base_url=rs.url, headers={"Authorization": f"Bearer {creds.token}"}) as device:
        for digest, data in my_blobs.items():  # through nginx, from either replica
            for _ in rs.replicas:
                r = device.get(f"/api/v1/device/blobs/{digest}")
                assert r.status_code == 200 and r.content == data
                assert "x-accel-redirect" not in r.headers
        ranged = device.get(f"/api/v1/device/blobs/{big}", headers={"Range": "bytes=2-5"})
        assert ranged.status_code == 206 and ranged.content == BIG[2:6]
        assert ranged.headers["content-range"] == f"bytes 2-5/{len(BIG)}"
        refused = device.get(f"/api/v1/device/blobs/{theirs}")
        assert refused.status_code == 403 and "desired state" in refused.json()["error"]["message"]
        # The internal location is for the replicas' answers only, token or not.
        assert device.get(f"/_edgepack/blobs/{hex_[:2]}/{hex_}").status_code == 404
        other = digest_hex(theirs)
        assert device.get(f"/_edgepack/blobs/{other[:2]}/{other}").status_code == 404
        # A path that is not a digest never becomes a file name.
        odd = device.get("/api/v1/device/blobs/sha256:..%2F..%2Fhub-0%2Fhub.db")
        assert odd.status_code in (400, 404) and "x-accel-redirect" not in odd.headers
    with httpx.Client(base_url=rs.url) as anonymous:
        assert anonymous.get(f"/api/v1/device/blobs/{big}").status_code == 401
        assert anonymous.get(f"/_edgepack/blobs/{hex_[:2]}/{hex_}").status_code == 404

    # What a replica answers nginx: the file's place, named by the digest, and no bytes.
    with rs.replicas[0].client(creds.token) as replica:
        answer = replica.get(f"/api/v1/device/blobs/{big}", headers={"Range": "bytes=5-"})
        assert answer.status_code == 200 and answer.content == b""
        assert answer.headers["x-accel-redirect"] == f"/_edgepack/blobs/{hex_[:2]}/{hex_}"
        assert replica.get(f"/api/v1/device/blobs/{theirs}").status_code == 403

    # A file replaced in the store by other bytes is checked before nginx is told to send it.
    model = next(d for d, data in my_blobs.items() if b"factor" in data)
    stored = FileBlobStore(rs.blob_dir).path(model)
    swapped = stored.with_name("swapped")
    swapped.write_bytes(b'{"factor":9}')
    os.replace(swapped, stored)
    with httpx.Client(base_url=rs.url, headers={"Authorization": f"Bearer {creds.token}"}) as device:
        for _ in rs.replicas:
            damaged = device.get(f"/api/v1/device/blobs/{model}")
            assert damaged.status_code == 422 and "does not match its digest" in damaged.text


def test_the_blob_folder_nginx_serves_is_named_safely(tmp_path: Path) -> None:
    conf = render_nginx_config(
        listen=Upstream("127.0.0.1", 8800), replicas=[Upstream("127.0.0.1", 8801)],
        run_dir=tmp_path, blob_dir=tmp_path / "blobs",
    )  # fmt: skip
    assert "location /_edgepack/blobs/ {\n            internal;\n" in conf
    assert f"alias {(tmp_path / 'blobs').resolve()}/sha256/;" in conf
    for bad in ("my blobs", "x;deny all", "a{b}", "$host", 'q"'):
        with pytest.raises(ConfigError, match=r"nginx\.conf cannot name"):
            render_nginx_config(
                listen=Upstream("127.0.0.1", 8800), replicas=[Upstream("127.0.0.1", 8801)],
                run_dir=tmp_path, blob_dir=tmp_path / bad,
            )  # fmt: skip


def test_replicas_share_a_file_store_named_by_url(tmp_path: Path) -> None:
    shared = tmp_path / "shared blobs"
    store = open_blob_store(HubSettings(data_dir=tmp_path / "hub", blob_store=shared.as_uri()))
    assert isinstance(store, FileBlobStore) and store.root == shared
    # Collected data goes where every replica sees it (a single hub's stays in its data dir).
    data = open_data_store(store, tmp_path / "hub")
    assert isinstance(data, FileDataStore) and data.root == shared / "data"
    alone = open_data_store(open_blob_store(HubSettings(data_dir=tmp_path / "hub")), tmp_path / "hub")
    assert isinstance(alone, FileDataStore) and alone.root == tmp_path / "hub" / "data"
    for bad in ("file://elsewhere/srv/blobs", "file:relative/blobs", "file:///srv/blobs?x=1"):
        with pytest.raises(ConfigError, match="file:///ABSOLUTE/FOLDER"):
            open_blob_store(HubSettings(data_dir=tmp_path / "hub", blob_store=bad))
