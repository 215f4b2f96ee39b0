"""Fetching modules the way the agent does, against a real hub over HTTP: progress, only the
missing blobs, resuming a partial blob, refusing bad bytes, the disk check, cancellation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cloud_hub.store.blobs import FileBlobStore
from cloud_hub.store.s3 import S3BlobStore
from edge_agent.cache.modules import ModuleCache
from edge_agent.download.module import Cancelled, Counters, FetchControl, fetch_module
from edge_agent.uplink.http import HubHttp
from manifests.device import DeviceCredentials
from manifests.digests import sha256_digest
from manifests.errors import TrustError, Unschedulable
from tests.agent.conftest import Fleet, free_port, score, wait_for
from tests.agent.modules import files
from tests.hub.broker_fixtures import MqttProbe

BIG = os.urandom(6 << 20)


@pytest.fixture
def device(fleet: Fleet) -> tuple[HubHttp, DeviceCredentials]:
    agent = fleet.device("edge-1")
    creds = DeviceCredentials.model_validate(agent.credentials)
    http = HubHttp(creds)
    yield http, creds
    http.close()


def control(
    progress: list[tuple[int, int]] | None = None, *, cancel_after_bytes: int | None = None
) -> FetchControl:
    seen = progress if progress is not None else []

    def cancelled() -> bool:
        return cancel_after_bytes is not None and bool(seen) and seen[-1][0] >= cancel_after_bytes

    return FetchControl(
        cancelled=cancelled, deadline=time.monotonic() + 60, progress=lambda d, t: seen.append((d, t))
    )


def deployed(fleet: Fleet, version: str, contents: dict[str, bytes]) -> str:
    module = fleet.push("demo", version, files=contents)
    fleet.deploy("demo", module, port=free_port(), devices=["edge-1"])
    return module.manifest_digest


def test_a_fetch_reports_progress_and_an_update_moves_only_the_changed_file(
    fleet: Fleet, device: tuple[HubHttp, DeviceCredentials], tmp_path: Path
) -> None:
    http, creds = device
    cache = ModuleCache(tmp_path / "cache")
    digest = deployed(fleet, "1", files(padding=BIG))
    progress: list[tuple[int, int]] = []
    counters = Counters()
    installed = fetch_module(http, cache, digest, creds.publishers, control(progress), counters)
    total = sum(f.size for f in installed.manifest.files)
    assert progress[0] == (0, total) and progress[-1] == (total, total)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress), "progress only rises"
    assert len(progress) > 2, "a 6 MB blob reports progress on the way"
    assert (counters.manifests, counters.blobs, counters.bytes) == (1, 3, total)
    assert (installed.dir / "model" / "weights.bin").read_bytes() == BIG

    v2 = {**files(padding=BIG), "src/score.py": b"def run(raw_data):\n    return 2\n"}
    digest2 = deployed(fleet, "2", v2)
    counters2 = Counters()
    fetch_module(http, cache, digest2, creds.publishers, control(), counters2)
    assert (counters2.blobs, counters2.bytes) == (1, len(v2["src/score.py"]))
    # Fetching what is installed already asks the hub for nothing.
    counters3 = Counters()
    fetch_module(http, cache, digest2, creds.publishers, control(), counters3)
    assert (counters3.manifests, counters3.blobs) == (0, 0)


def test_a_partial_blob_is_resumed_and_one_that_does_not_match_is_discarded(
    fleet: Fleet, device: tuple[HubHttp, DeviceCredentials], tmp_path: Path
) -> None:
    http, creds = device
    cache = ModuleCache(tmp_path / "cache")
    digest = deployed(fleet, "1", files(padding=BIG))
    blob = sha256_digest(BIG)
    partial = cache.blobs.partial_path(blob)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(BIG[: len(BIG) // 3])  # what a killed agent left
    counters = Counters()
    fetch_module(http, cache, digest, creds.publishers, control(), counters)
    small = sum(len(v) for k, v in files().items())
    assert counters.bytes == len(BIG) - len(BIG) // 3 + small, "only the rest was downloaded"
    assert cache.blobs.path(blob).read_bytes() == BIG and not partial.exists()

    # A partial blob with wrong bytes (a disk error) can never match: it is thrown away whole.
    other = ModuleCache(tmp_path / "other")
    bad = other.blobs.partial_path(blob)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\0" * (len(BIG) // 2))
    with pytest.raises(TrustError, match="does not match its digest"):
        fetch_module(http, other, digest, creds.publishers, control(), Counters())
    assert not bad.exists() and not other.blobs.has(blob)
    fetch_module(http, other, digest, creds.publishers, control(), Counters())  # the next try works
    assert other.blobs.path(blob).read_bytes() == BIG


def test_a_cancelled_fetch_stops_at_a_chunk_and_keeps_what_arrived(
    fleet: Fleet, device: tuple[HubHttp, DeviceCredentials], tmp_path: Path
) -> None:
    http, creds = device
    cache = ModuleCache(tmp_path / "cache")
    digest = deployed(fleet, "1", files(padding=BIG))
    with pytest.raises(Cancelled):
        fetch_module(http, cache, digest, creds.publishers, control(cancel_after_bytes=4 << 20), Counters())
    kept = cache.blobs.partial_size(sha256_digest(BIG))
    assert 0 < kept < len(BIG)
    assert cache.installed() == []


def test_a_module_that_cannot_fit_on_the_disk_downloads_nothing(
    fleet: Fleet, device: tuple[HubHttp, DeviceCredentials], tmp_path: Path
) -> None:
    http, creds = device
    cache = ModuleCache(tmp_path / "cache")
    digest = deployed(fleet, "1", files(padding=BIG))
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    counters = Counters()
    with pytest.raises(Unschedulable, match=r"needs \d+ bytes of disk .* but \d+ are free"):
        fetch_module(http, cache, digest, creds.publishers, control(), counters, reserve_bytes=free)
    assert (counters.manifests, counters.blobs, counters.bytes) == (1, 0, 0)


def test_progress_a_device_reports_shows_in_the_hubs_roll_up(fleet: Fleet) -> None:
    agent = fleet.device("edge-1")
    module = fleet.push("demo", "1")
    fleet.deploy("demo", module, port=8890, devices=["edge-1"])
    creds = agent.credentials
    device = MqttProbe.connect(fleet.broker.host, fleet.broker.port, username="edge-1",
                               password=creds["mqtt"]["password"])  # fmt: skip
    try:
        report = {
            "schema": "edgepack.reported/v1", "device_id": "edge-1", "reported_at": "2026-06-01T00:00:00Z",
            "agent_version": "test", "applied_generation": 2, "runtimes": ["process"],
            "modules": [{"service": "demo", "manifest_digest": module.manifest_digest, "version": "1",
                         "state": "Transitioning", "reason": "downloading version 1",
                         "since": "2026-06-01T00:00:00Z",
                         "progress": {"phase": "download", "done_bytes": 3_000_000,
                                      "total_bytes": 9_000_000}}],
        }  # fmt: skip
        device.publish(f"{fleet.prefix}/devices/edge-1/reported", json.dumps(report), retain=True)

        def shown() -> dict[str, object] | None:
            got = fleet.rollup("demo")["devices"][0].get("progress")
            return got if got else None

        assert wait_for(shown, what="the progress") == {"phase": "download", "done_bytes": 3_000_000,
                                                          "total_bytes": 9_000_000}  # fmt: skip
    finally:
        device.close()


def test_two_services_of_one_module_on_a_fresh_device_share_one_download(fleet: Fleet) -> None:
    # Both services are in the first desired state the device sees, so both fetches of the
    # same blobs start together.
    agent = fleet.device("edge-1")
    module = fleet.push("demo", "1", files=files(padding=BIG))
    for twin in ("twin-a", "twin-b"):
        fleet.deploy(twin, module, port=free_port(), devices=["edge-1"])
    agent.start()
    for twin in ("twin-a", "twin-b"):
        agent.wait_state(twin, "Healthy", timeout=90)
    blobs = next(agent.state_dir.rglob("blobs/sha256"))
    held = {entry.name: entry.read_bytes() for entry in blobs.iterdir()}
    expected = {f.digest.removeprefix("sha256:"): f.size for f in module.manifest.files}
    assert {name: len(data) for name, data in held.items()} == expected, "each blob once, whole"
    assert all(sha256_digest(data) == "sha256:" + name for name, data in held.items())


def tamper_on_the_hub(fleet: Fleet, digest: str, data: bytes) -> None:
    """Flip the first byte of a blob in the hub's store, behind the hub's back."""
    forged = bytes([data[0] ^ 0xFF]) + data[1:]
    store = fleet.hub.core.blobs
    if isinstance(store, FileBlobStore):
        store.path(digest).write_bytes(forged)
    else:
        assert isinstance(store, S3BlobStore)
        store.client.put_object(Bucket=store.location.bucket, Key=store.key(digest), Body=forged)


@pytest.mark.parametrize("size", [100_000, 3 << 20], ids=["small", "large"])
def test_a_blob_tampered_on_the_hub_fails_the_version_naming_it_while_the_last_good_serves(
    fleet: Fleet, size: int
) -> None:
    # Under 1 MiB the hub answers 422 at once; over it, the streamed answer is cut off before
    # its end and the resumed Range request is refused. Either way: final, not retried.
    agent = fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy")
    data = os.urandom(size)
    digest = sha256_digest(data)
    v2 = fleet.push("demo", "2", files=files(factor=3, padding=data))
    tamper_on_the_hub(fleet, digest, data)
    fleet.deploy("demo", v2, port=port, devices=["edge-1"])
    failed = agent.wait_state("demo", "Failed", timeout=60)
    assert digest in failed["reason"] and "does not match its digest" in failed["reason"]
    assert score(port, [1]) == {"result": [2]}, "version 1 still serves"


def test_a_blob_changed_in_place_in_the_hubs_store_is_refused_by_the_device(
    fleet: Fleet, device: tuple[HubHttp, DeviceCredentials], tmp_path: Path
) -> None:
    # The hub checks a blob file once per process (cloud_hub.api.downloads): bytes that rot in
    # place after that, the file's size and times unchanged, reach the device, which must
    # refuse them (whole, and when resumed) and keep nothing.
    http, creds = device
    digest = deployed(fleet, "1", files(padding=BIG))
    blob = sha256_digest(BIG)
    fetch_module(http, ModuleCache(tmp_path / "first"), digest, creds.publishers, control(), Counters())
    store = fleet.hub.core.blobs
    assert isinstance(store, FileBlobStore), "the file store's check-once is what this is about"
    path = Path(store.path(blob))
    before = path.stat()
    with path.open("r+b") as fh:
        fh.seek(len(BIG) - 1)
        fh.write(bytes([BIG[-1] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    whole = ModuleCache(tmp_path / "whole")
    with pytest.raises(TrustError, match="does not match its digest"):
        fetch_module(http, whole, digest, creds.publishers, control(), Counters())
    assert not whole.blobs.has(blob) and whole.installed() == []
    resumed = ModuleCache(tmp_path / "resumed")
    partial = resumed.blobs.partial_path(blob)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(BIG[: len(BIG) // 2])
    with pytest.raises(TrustError, match="does not match its digest"):
        fetch_module(http, resumed, digest, creds.publishers, control(), Counters())
    assert not resumed.blobs.has(blob) and not partial.exists()
