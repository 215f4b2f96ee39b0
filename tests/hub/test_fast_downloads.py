"""Device downloads on the fast path (cloud_hub.api.downloads): a rollout's repeated
downloads cost the hub no database query, and every guarantee of the slow path holds —
only what the device's current state names, a revoked device refused (at once on this hub,
within ``download_grant_ttl_s`` when revoked elsewhere), damaged blobs refused."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
from sqlalchemy import event, select, update

from cloud_hub.api.downloads import QuietDownloads
from cloud_hub.events import Event
from cloud_hub.fleet.grant_source import WARM_CHUNK, DatabaseGrants, GrantWarmer
from cloud_hub.fleet.grants import DownloadGrants, Verdict
from cloud_hub.fleet.tables import Device
from cloud_hub.store.blobs import FileBlobStore
from manifests.digests import sha256_digest
from tests.factory import Forge, default_files
from tests.hub.conftest import HubFactory, Publisher, RunningHub
from tests.hub.fleet_support import PushedModule, deploy, enroll, push


@contextmanager
def statements(running: RunningHub) -> Iterator[list[str]]:
    """Every SQL statement the hub sends for requests while the block runs: from the server's
    event loop or the worker threads it hands work to (the hub's background loops, which
    query on their own schedule, run on threads of their own)."""
    seen: list[str] = []
    server = running._thread.ident

    def record(*args: Any) -> None:
        thread = threading.current_thread()
        if thread.ident == server or thread.name == "AnyIO worker thread":
            seen.append(str(args[2]))

    engine = running.core.sessions.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def fetch_all(dev: httpx.Client, module: PushedModule) -> list[int]:
    codes = [dev.get(f"/api/v1/device/manifests/{module.digest}").status_code]
    return codes + [dev.get(f"/api/v1/device/blobs/{d}").status_code for d in module.blob_digests]


def test_a_device_downloading_again_costs_the_hub_no_database_query(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub(download_grant_ttl_s=300)
    module = push(h, publisher, "digits", "1")
    with h.client() as http:
        dev = enroll(http, "dev-a")
        deploy(http, "digits", module, devices=["dev-a"])
    with h.client(token=dev.token) as device:
        assert set(fetch_all(device, module)) == {200}
        with statements(h) as seen:
            assert set(fetch_all(device, module)) == {200}
            first = module.blob_digests[0]
            ranged = device.get(f"/api/v1/device/blobs/{first}", headers={"Range": "bytes=1-3"})
    assert seen == []
    assert ranged.status_code == 206 and ranged.headers["content-range"].startswith("bytes 1-3/")


def test_a_new_state_and_a_revocation_on_this_hub_take_effect_at_once(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub(download_grant_ttl_s=300)
    v1 = push(h, publisher, "digits", "1", factor=2)
    v2 = push(h, publisher, "digits", "2", factor=3)
    with h.client() as http:
        dev = enroll(http, "dev-a")
        deploy(http, "digits", v1, devices=["dev-a"])
    with h.client(token=dev.token) as device:
        assert set(fetch_all(device, v1)) == {200}  # the grant is now remembered
        with h.client() as http:
            deploy(http, "digits", v2, devices=["dev-a"])
        assert set(fetch_all(device, v2)) == {200}
        only_v1 = [d for d in v1.blob_digests if d not in v2.blob_digests]
        assert device.get(f"/api/v1/device/manifests/{v1.digest}").status_code == 403
        assert {device.get(f"/api/v1/device/blobs/{d}").status_code for d in only_v1} == {403}
        with h.client() as http:
            assert http.post("/api/v1/devices/dev-a/revoke").status_code == 200
        assert set(fetch_all(device, v2)) == {401}


def test_a_device_revoked_by_another_replica_is_refused_within_the_grant_ttl(
    hub: HubFactory, publisher: Publisher
) -> None:
    ttl = 1.0
    h = hub(download_grant_ttl_s=ttl)
    module = push(h, publisher, "digits", "1")
    with h.client() as http:
        dev = enroll(http, "dev-a")
        deploy(http, "digits", module, devices=["dev-a"])
    with h.client(token=dev.token) as device:
        assert set(fetch_all(device, module)) == {200}
        # Another replica revokes it: only the shared database changes, this hub is not told.
        with h.core.sessions.begin() as s:
            s.execute(update(Device).where(Device.id == "dev-a").values(revoked=True))
        revoked_at = time.monotonic()
        time.sleep(ttl)
        assert set(fetch_all(device, module)) == {401}
    assert time.monotonic() - revoked_at >= ttl


def test_another_devices_module_and_an_unassigned_digest_are_refused_with_a_warm_grant(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub(download_grant_ttl_s=300)
    mine = push(h, publisher, "digits", "1", factor=2)
    theirs = push(h, publisher, "other", "1", factor=5)
    unassigned = push(h, publisher, "spare", "1", factor=7)
    with h.client() as http:
        a = enroll(http, "dev-a")
        enroll(http, "dev-b")
        deploy(http, "digits", mine, devices=["dev-a"])
        deploy(http, "other", theirs, devices=["dev-b"])
    with h.client(token=a.token) as device:
        assert set(fetch_all(device, mine)) == {200}
        for other in (theirs, unassigned):
            assert device.get(f"/api/v1/device/manifests/{other.digest}").status_code == 403
            foreign = [d for d in other.blob_digests if d not in mine.blob_digests]
            answers = [device.get(f"/api/v1/device/blobs/{d}") for d in foreign]
            assert {r.status_code for r in answers} == {403}
            assert all("desired state" in r.json()["error"]["message"] for r in answers)
        assert device.get(f"/api/v1/device/blobs/sha256:{'0' * 64}").status_code == 403
    with httpx.Client(base_url=h.url) as anonymous:
        assert anonymous.get(f"/api/v1/device/blobs/{mine.blob_digests[0]}").status_code == 401


def test_a_blob_file_changed_after_it_was_served_is_checked_again_and_refused(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub()
    module = push(h, publisher, "digits", "1")
    with h.client() as http:
        dev = enroll(http, "dev-a")
        deploy(http, "digits", module, devices=["dev-a"])
    store = h.core.blobs
    assert isinstance(store, FileBlobStore)
    digest = module.blob_digests[0]
    with h.client(token=dev.token) as device:
        assert device.get(f"/api/v1/device/blobs/{digest}").status_code == 200
        path = Path(store.path(digest))
        data = path.read_bytes()
        path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
        answer = device.get(f"/api/v1/device/blobs/{digest}")
    assert answer.status_code == 422 and digest in answer.json()["error"]["message"]
    with h.core.sessions.begin() as s:
        kinds = s.scalars(select(Event.kind)).all()
    assert "blob-corrupt" in kinds


# --- the grant table alone -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_grants_expire_after_their_ttl_and_a_refusal_is_always_asked_again() -> None:
    clock = Clock()
    grants = DownloadGrants(ttl_s=5, max_devices=10, max_modules=10, clock=clock)
    grant = grants.remember("t1", "dev-1", frozenset({"m1"}), as_of=grants.epoch)
    assert grants.manifest_verdict(grant, "m1", fresh=False) is Verdict.ALLOWED
    assert grants.manifest_verdict(grant, "m2", fresh=False) is Verdict.ASK_AGAIN
    assert grants.manifest_verdict(grant, "m2", fresh=True) is Verdict.REFUSED
    assert grants.blob_verdict(grant, "b1", fresh=True) is Verdict.ASK_AGAIN  # m1's blobs unknown
    grants.remember_blobs({"m1": frozenset({"b1"})})
    assert grants.blob_verdict(grant, "b1", fresh=False) is Verdict.ALLOWED
    assert grants.blob_verdict(grant, "b2", fresh=True) is Verdict.REFUSED
    clock.now = 4.9
    assert grants.cached("t1") is grant
    clock.now = 5.0
    assert grants.cached("t1") is None


def test_grants_are_forgotten_per_device_and_bounded() -> None:
    grants = DownloadGrants(ttl_s=60, max_devices=2, max_modules=1, clock=Clock())
    shared = frozenset({"m1"})
    first = grants.remember("t1", "dev-1", shared, as_of=grants.epoch)
    second = grants.remember("t2", "dev-2", frozenset({"m1"}), as_of=grants.epoch)
    assert first.manifests is second.manifests, "devices given the same modules share one set"
    grants.forget(["dev-1"])
    assert grants.cached("t1") is None and grants.cached("t2") is second
    grants.remember("t3", "dev-3", shared, as_of=grants.epoch)
    grants.remember("t4", "dev-4", shared, as_of=grants.epoch)
    assert len(grants) == 2 and grants.cached("t2") is None
    grants.remember_blobs({"m1": frozenset({"b1"}), "m2": frozenset({"b2"})})
    assert grants.missing_modules(first) == ["m1"]


def test_a_grant_loaded_across_a_revocation_is_used_once_but_not_kept() -> None:
    # A download's load and the revocation race: the load read the database before the
    # revocation was committed. Keeping what it read would undo the revocation until the TTL.
    grants = DownloadGrants(ttl_s=60, max_devices=10, max_modules=10, clock=Clock())
    as_of = grants.epoch
    grants.forget(["dev-1"])  # revoked here while the load ran
    grant = grants.remember("t1", "dev-1", frozenset({"m1"}), as_of=as_of)
    assert grant.device_id == "dev-1" and grants.cached("t1") is None
    assert grants.remember_many([("t1", "dev-1", frozenset({"m1"}))], as_of=as_of) == 0
    assert grants.cached("t1") is None


class SlowSource:
    """What a rollout's read of many grants looks like to the clock: each chunk of WARM_CHUNK
    devices is read as of when its query starts, and takes 20 s."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def grants_of(self, device_ids: list[str]) -> list[tuple[str, str, frozenset[str] | None]]:
        read: list[tuple[str, str, frozenset[str] | None]] = []
        for at in range(0, len(device_ids), WARM_CHUNK):
            read += [(f"t-{d}", d, frozenset({"m1"})) for d in device_ids[at : at + WARM_CHUNK]]
            self.clock.now += 20
        return read


def test_a_grant_read_ahead_lives_the_ttl_from_its_read_not_from_a_slow_loads_end() -> None:
    # security.md: a grant is used for at most download_grant_ttl_s after it was read. A device
    # revoked on another replica just after its chunk was read must be refused by then.
    clock = Clock()
    grants = DownloadGrants(ttl_s=30, max_devices=5000, max_modules=10, clock=clock)
    devices = [f"dev-{i}" for i in range(WARM_CHUNK + 1)]  # two chunks: read at 0 s and 20 s
    warmer = GrantWarmer(grants, cast(DatabaseGrants, SlowSource(clock)))
    warmer(devices)
    deadline = time.monotonic() + 10
    while len(grants) < len(devices) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert clock.now == 40 and len(grants) == len(devices)
    clock.now = 29.9
    assert grants.cached("t-dev-0") is not None
    clock.now = 30.0
    assert grants.cached("t-dev-0") is None, "read at 0 s, still used 30 s later"
    assert grants.cached(f"t-dev-{WARM_CHUNK}") is not None  # its chunk was read at 20 s
    clock.now = 50.0
    assert grants.cached(f"t-dev-{WARM_CHUNK}") is None


def test_the_first_downloads_after_a_deploy_need_no_query_per_device(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub(download_grant_ttl_s=300)
    module = push(h, publisher, "digits", "1")
    with h.client() as http:
        devices = [enroll(http, f"dev-{i}") for i in range(5)]
        deploy(http, "digits", module, devices=[d.id for d in devices])
    # Loaded ahead on a thread of the hub's own, which the deploy's answer does not wait for.
    deadline = time.monotonic() + 10
    while len(h.process.grants) < len(devices) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(h.process.grants) == len(devices)
    first, *others = devices
    with h.client(token=first.token) as device:  # the module's manifest and blob list, once
        assert set(fetch_all(device, module)) == {200}
    with statements(h) as seen:
        for d in others:
            with h.client(token=d.token) as device:
                assert set(fetch_all(device, module)) == {200}
    assert seen == []


def test_a_download_answer_is_the_same_json_error_as_other_routes(hub: HubFactory) -> None:
    h = hub()
    with httpx.Client(base_url=h.url, headers={"Authorization": "Bearer " + os.urandom(8).hex()}) as c:
        r = c.get(f"/api/v1/device/manifests/sha256:{'1' * 64}")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "Unauthorized"


def test_successful_downloads_are_left_out_of_the_access_log_and_refusals_are_not() -> None:
    quiet = QuietDownloads()

    def kept(path: str, status: int) -> bool:
        record = logging.LogRecord(
            "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
            ("127.0.0.1:5000", "GET", path, "1.1", status), None,
        )  # fmt: skip
        return quiet.filter(record)

    blob = f"/api/v1/device/blobs/sha256:{'a' * 64}"
    assert not kept(blob, 200) and not kept(blob, 206)
    assert not kept(f"/api/v1/device/manifests/sha256:{'b' * 64}", 200)
    assert kept(blob, 403) and kept(blob, 401)
    assert kept("/api/v1/device/desired", 200) and kept("/api/v1/modules", 200)


def read_bytes_of_this_process() -> int:
    """Bytes this process (the test and the in-process hub) has read through read calls."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_large_download_the_device_gives_up_on_stops_being_read(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub()
    size = 64 << 20
    files = {**default_files(2), "model/weights.bin": os.urandom(size)}
    forge = Forge(publisher=publisher.key)
    with h.client() as http:
        r = http.post("/api/v1/modules", content=forge.bundle(files=files, name="big", version="1"))
        assert r.status_code == 201, r.text
        module = PushedModule("big", "1", forge.module(files=files, name="big", version="1"))
        dev = enroll(http, "dev-a")
        deploy(http, "big", module, devices=["dev-a"])
    blob = sha256_digest(files["model/weights.bin"])
    with h.client(token=dev.token, timeout=120) as device:
        assert device.get(f"/api/v1/device/blobs/{blob}").content == files["model/weights.bin"]
    before = read_bytes_of_this_process()
    with h.client(token=dev.token) as device, device.stream("GET", f"/api/v1/device/blobs/{blob}") as answer:
        assert answer.status_code == 200
        next(answer.iter_raw(1 << 20))
    # The hub notices the closed connection at its next chunk: give it time to read on, if it
    # (wrongly) would, then see that it read a few chunks, not the 64 MiB.
    time.sleep(2)
    assert read_bytes_of_this_process() - before < size // 4
