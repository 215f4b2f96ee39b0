"""The scaled-out layout with ``download_offload = "nginx"``: the replicas only decide, nginx
fetches the blob from S3 on a presigned GET (cloud_hub.api.downloads, cloud_hub.balancer.nginx).

What must still hold: a device gets only its own module's blobs, ``Range`` works, the S3 URL
never reaches the device and expires, nginx's internal location is not reachable from outside,
and the device's token is not sent to S3.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from manifests.digests import sha256_digest
from tests.conftest import Publisher
from tests.factory import Forge, default_files
from tests.hub.replica_fixtures import ReplicaSet, ReplicaSetFactory
from tests.hub.seaweedfs_fixtures import SeaweedFS

pytestmark = pytest.mark.scale_out

BUNDLE = {"Content-Type": "application/vnd.edgepack.module+tar"}
URL_TTL_S = 5


def push(rs: ReplicaSet, publisher: Publisher, name: str, factor: int) -> tuple[str, dict[str, bytes]]:
    files = default_files(factor)
    bundle = Forge(publisher=publisher.key).bundle(files=files, name=name, version="1")
    with rs.client() as http:
        r = http.post("/api/v1/modules", content=bundle, headers=BUNDLE)
        assert r.status_code == 201, r.text
        return str(r.json()["manifest_digest"]), {sha256_digest(data): data for data in files.values()}


def enroll_and_deploy(rs: ReplicaSet, device_id: str, module: str) -> str:
    with rs.client() as http:
        r = http.post("/api/v1/devices", json={"id": device_id, "tags": {"who": device_id}})
        assert r.status_code == 201, r.text
        body = {"module": module, "version": "1", "settings": {"port": 8890},
                "target": {"selector": f"who={device_id}"}}  # fmt: skip
        assert http.put(f"/api/v1/deployments/{module}", json=body).status_code == 201
        return str(r.json()["credentials"]["token"])


def test_nginx_sends_blobs_from_s3_and_every_guarantee_holds(
    replica_set: ReplicaSetFactory, publisher: Publisher, seaweedfs: SeaweedFS
) -> None:
    rs = replica_set(2, s3_offload=True, extra_env={"EDGEPACK_HUB_DOWNLOAD_URL_TTL_S": str(URL_TTL_S)})
    mine, my_blobs = push(rs, publisher, "digits", 2)
    _, their_blobs = push(rs, publisher, "other", 5)
    token = enroll_and_deploy(rs, "dev-a", "digits")
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
