"""Collected production data on the hub: a device uploads batches (gzip JSON lines), the hub
checks and stores them under Azure's layout, the admin lists and downloads them
(docs/data-collection.md). Against a real hub, a real enrolled device token, both stores."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from cloud_hub.data.tables import DataBatch
from cloud_hub.errors import NotFound
from cloud_hub.events import Event
from cloud_hub.ingest.tables import TelemetrySample
from manifests.data import MAX_BATCH_BYTES, RECORDS_HEADER, UPLOAD_PATH, blob_key
from manifests.reported import ModuleMetrics, Telemetry
from packager.sdk import Hub, Service
from packager.sdk.data import DataFilter, download_service_data, list_batches
from tests.conftest import Publisher
from tests.factory import Forge, default_files
from tests.hub.conftest import ADMIN_TOKEN, HubFactory, RunningHub
from tests.hub.data_support import (
    DAY,
    batch_of,
    device_running,
    digest_of,
    gz,
    head_only,
    key_of,
    lines,
    record,
    upload,
)
from tests.hub.fleet_support import PushedModule, deploy, enroll, push
from tests.hub.test_registry_cli import ok_json, run
from tests.hub.test_serving_bounds import MIB, PeakRss, hub_process  # noqa: F401  (fixture)
from tests.hub.test_serving_bounds import HubProcess as HubProcessUnderTest
from tests.hub.webhook_receiver import Receiver, start_receiver


def _batches(h: RunningHub) -> int:
    with h.core.sessions.begin() as s:
        return int(s.scalar(select(func.count()).select_from(DataBatch)) or 0)


def _stored_files(h: RunningHub) -> list[Path]:
    root = h.data_dir / "data"
    return [p for p in root.rglob("*") if p.is_file()]


def stored_telemetry(device_id: str, service: str, *, spooled: int, dropped: int) -> TelemetrySample:
    """A sample as the ingest stores an agent's telemetry (manifests.reported.Telemetry)."""
    metrics = ModuleMetrics(
        service=service,
        requests_total=10,
        errors_total=0,
        requests_per_s=1.0,
        data_spooled_bytes=spooled,
        data_dropped_total=dropped,
    )
    sample = Telemetry(device_id=device_id, ts=datetime.now(UTC), modules=[metrics])
    return TelemetrySample(
        device_id=device_id, ts=sample.ts, payload=sample.model_dump(mode="json", by_alias=True)
    )


def _error(r: Any, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"type", "message"}
    return str(body["error"]["message"])


@pytest.mark.both_blob_stores
def test_a_batch_is_stored_once_under_azures_layout_listed_and_downloaded(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub()
    device = device_running(h, publisher, "edge-1", "digits")
    key = key_of("digits")
    body, records = batch_of(key, 25)

    first = upload(h, device.token, key, body, records=25)
    again = upload(h, device.token, key, body, records=25)

    assert first.status_code == 201, first.text
    assert again.status_code == 200, again.text  # the same batch again: stored before
    stored = first.json()
    assert stored["path"] == blob_key(key, "edge-1", digest_of(body))
    assert stored["path"].startswith("digits/digits/3/inputs/2026/12/07/edge-1-")
    assert (stored["records"], stored["bytes"], stored["device_id"]) == (25, len(body), "edge-1")
    assert again.json() == stored
    assert _batches(h) == 1
    with h.client() as http:
        listed = http.get("/api/v1/services/digits/data").json()
        download = http.get(f"/api/v1/services/digits/data/{digest_of(body)}")
    assert [b["digest"] for b in listed["batches"]] == [digest_of(body)]
    assert listed["next"] is None
    assert download.status_code == 200
    assert download.content == body
    assert download.headers[RECORDS_HEADER] == "25"
    back = [r for r in gzip.decompress(download.content).splitlines()]
    assert back == lines(records).splitlines()
    with h.core.sessions.begin() as s:
        kinds = list(s.scalars(select(Event.kind).where(Event.kind == "data.batch-received")))
    assert kinds == ["data.batch-received"]  # one event: the second upload stored nothing
    if h.overrides.get("blob_store") is None:
        assert (h.data_dir / "data" / stored["path"]).read_bytes() == body


def test_a_batch_whose_bytes_are_gone_from_the_store_is_a_404_not_a_cut_off_200(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub()
    device = device_running(h, publisher, "edge-1", "digits")
    key = key_of("digits")
    body, _ = batch_of(key, 5)
    stored = upload(h, device.token, key, body, records=5).json()
    (h.data_dir / "data" / stored["path"]).unlink()  # lost outside the hub (a disk, a hand)
    with h.client() as http:
        answer = http.get(f"/api/v1/services/digits/data/{digest_of(body)}")
    assert "is not in the store" in _error(answer, 404)


def test_a_record_count_of_other_digits_than_ascii_is_a_400_not_a_500(
    hub: HubFactory, publisher: Publisher
) -> None:
    # str.isdigit() says yes to '²' (latin-1 0xb2, as a header reads), which int() refuses.
    h = hub()
    device = device_running(h, publisher, "edge-1", "digits")
    key = key_of("digits")
    body, _ = batch_of(key, 2)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/x-ndjson", RECORDS_HEADER: b"\xb2"}
    with h.client(token=device.token) as http:
        answer = http.put(f"{UPLOAD_PATH}/{digest_of(body)}?{key.query()}", content=body, headers=headers)
    assert RECORDS_HEADER in _error(answer, 400)
    assert _batches(h) == 0


def test_bad_batches_are_refused_with_a_reason_and_nothing_is_stored(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub()
    device = device_running(h, publisher, "edge-1", "digits")
    key = key_of("digits")
    good, _ = batch_of(key, 3)
    other_service = gz(lines([record(key, 0), record(key, 1, service="other")]))
    other_day = gz(lines([record(key, 0), record(key_of("digits", day=DAY + timedelta(days=1)), 1)]))
    unknown_field = gz(lines([record(key, 0, secret="x")]))
    naive_time = gz(lines([record(key, 0, time="2026-12-07T10:00:00")]))
    # 50 valid records of 1.5 MiB of one letter: 75 MiB unpacked, ~80 KiB as sent.
    bomb = gz(lines([record(key, n, data="a" * 1_500_000) for n in range(50)]))

    cases = [
        (upload(h, device.token, key, good, records=3, digest=digest_of(b"other")), 422, "digest"),
        (upload(h, device.token, key, b"not gzip at all", records=1), 422, "gzip"),
        (upload(h, device.token, key, good[:-8], records=3), 422, "gzip"),
        (upload(h, device.token, key, good, records=2), 422, "more than the 2 records"),
        (upload(h, device.token, key, good, records=4), 422, "declares 4"),
        (upload(h, device.token, key, other_service, records=2), 422, "line 2 is a record of other/"),
        (upload(h, device.token, key, other_day, records=2), 422, "2026-12-08"),
        (upload(h, device.token, key, unknown_field, records=1), 422, "secret"),
        (upload(h, device.token, key, naive_time, records=1), 422, "UTC"),
        (upload(h, device.token, key, bomb, records=50), 413, "decompresses to more than"),
        (upload(h, device.token, key, good, records=3, headers={"Content-Encoding": "br"}), 400, "gzip"),
        (
            upload(h, device.token, key, good, records=3, headers={"Content-Type": "text/plain"}),
            400,
            "x-ndjson",
        ),
        (upload(h, device.token, key, good, records=0), 400, RECORDS_HEADER),
    ]
    for response, status, why in cases:
        assert why in _error(response, status), response.text
    with h.client(token=device.token) as http:
        bad_key = http.put(
            f"{UPLOAD_PATH}/{digest_of(good)}?service=digits&model=..&model_version=3&designation=inputs&day=2026-12-07",
            content=good,
        )
        bad_digest = http.put(f"{UPLOAD_PATH}/sha256:abc?{key.query()}", content=good)
    assert "model" in _error(bad_key, 400)
    assert "digest" in _error(bad_digest, 400)
    assert _batches(h) == 0
    assert _stored_files(h) == []


def test_a_body_is_not_read_before_the_device_and_its_right_to_send_were_checked(
    hub: HubFactory, publisher: Publisher
) -> None:
    """Each refusal comes from the request's head alone: the test sends no byte of the 8 MiB the
    head announces and gets its answer (a hub that read the body would wait for it)."""
    h = hub()
    device = device_running(h, publisher, "edge-1", "digits")
    with h.client() as http:
        stranger = enroll(http, "edge-2")  # enrolled, but never ran "digits"
    key = key_of("digits")
    path = f"{UPLOAD_PATH}/{digest_of(b'x')}?{key.query()}"
    head = {"Content-Encoding": "gzip", "Content-Type": "application/x-ndjson", RECORDS_HEADER: "1"}

    nobody = head_only(h, path, {**head, "Content-Length": str(MAX_BATCH_BYTES)})
    forged = head_only(h, path, {**head, "Content-Length": "1000", "Authorization": "Bearer ep_dev_forged"})
    other = head_only(
        h, path, {**head, "Content-Length": "1000", "Authorization": f"Bearer {stranger.token}"}
    )
    huge = head_only(
        h,
        path,
        {**head, "Content-Length": str(MAX_BATCH_BYTES + 1), "Authorization": f"Bearer {device.token}"},
    )

    assert nobody.startswith(b"HTTP/1.1 401")
    assert forged.startswith(b"HTTP/1.1 401")
    assert other.startswith(b"HTTP/1.1 403")
    assert b"is not one device 'edge-2' runs or ran" in other
    assert huge.startswith(b"HTTP/1.1 413")


def test_a_device_over_its_data_budget_is_told_when_to_come_back(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub(data_burst_mb=8, data_mb_per_hour=1)
    device = device_running(h, publisher, "edge-1", "digits")
    key = key_of("digits")
    # Hex of random bytes halves when compressed: each batch is ~3.5 MiB, so the third passes the 8 MiB burst.
    sizes = []
    for n in range(3):
        records = [record(key, i, data=os.urandom(450_000).hex()) for i in range(7)]
        body = gz(lines(records))
        sizes.append(len(body))
        answer = upload(h, device.token, key, body, records=7)
        if n < 2:
            assert answer.status_code == 201, answer.text
    assert sum(sizes) > 8 << 20 > sum(sizes[:2])
    assert "budget" in _error(answer, 429)
    assert int(answer.headers["Retry-After"]) > 60  # 1 MiB an hour: minutes, not seconds
    assert _batches(h) == 2


def test_a_device_may_still_upload_the_data_of_a_service_that_moved_away(
    hub: HubFactory, publisher: Publisher
) -> None:
    """A device offline while its service moved comes back with the service's data spooled."""
    h = hub()
    device = device_running(h, publisher, "edge-1", "digits")
    module = push(h, publisher, "digits-mod", "1")
    with h.client() as http:
        enroll(http, "edge-9")
        assert deploy(http, "digits", module, devices=["edge-9"]).status_code == 200
    key = key_of("digits")
    body, _ = batch_of(key, 2)
    assert upload(h, device.token, key, body, records=2).status_code == 201

    strict = h.restart(data_grace_days=0)
    late, _ = batch_of(key, 3)
    assert "ran in the last 0 days" in _error(upload(strict, device.token, key, late, records=3), 403)


@pytest.mark.both_blob_stores
def test_collected_data_past_its_retention_is_deleted_with_its_bytes(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub(data_retention_days=30)
    device = device_running(h, publisher, "edge-1", "digits")
    key = key_of("digits")
    old, _ = batch_of(key, 2)
    assert upload(h, device.token, key, old, records=2).status_code == 201
    data = h.process.data
    assert data is not None
    stored = data.find("digits", digest_of(old), None)
    with h.core.sessions.begin() as s:  # received a month ago
        row = s.scalars(select(DataBatch).where(DataBatch.digest == digest_of(old))).one()
        row.received_at = datetime.now(UTC) - timedelta(days=31)
    fresh, _ = batch_of(key, 3)
    assert upload(h, device.token, key, fresh, records=3).status_code == 201

    assert data.prune() == 1

    with h.client() as http:
        listed = http.get("/api/v1/services/digits/data").json()["batches"]
        gone = http.get(f"/api/v1/services/digits/data/{digest_of(old)}")
    assert [b["digest"] for b in listed] == [digest_of(fresh)]
    assert "no data batch" in _error(gone, 404)
    with pytest.raises(NotFound):
        data.store.open(stored.path, stored.digest)  # the bytes went with the row


def test_the_listing_pages_filters_and_shows_each_devices_spool(
    hub: HubFactory, publisher: Publisher
) -> None:
    h = hub()
    device = device_running(h, publisher, "edge-1", "digits")
    inputs, predictions = key_of("digits"), key_of("digits", designation="predictions")
    for n in range(3):
        body = gz(lines([record(inputs, n)]))
        assert upload(h, device.token, inputs, body, records=1).status_code == 201
    body, _ = batch_of(predictions, 2)
    assert upload(h, device.token, predictions, body, records=2).status_code == 201
    with h.core.sessions.begin() as s:
        s.add(stored_telemetry("edge-1", "digits", spooled=4096, dropped=7))
    with h.client() as http:
        page1 = http.get("/api/v1/services/digits/data", params={"designation": "inputs", "limit": 2}).json()
        page2 = http.get(
            "/api/v1/services/digits/data",
            params={"designation": "inputs", "limit": 2, "after": page1["next"]},
        ).json()
        late = http.get("/api/v1/services/digits/data", params={"since": "2026-12-07T10:00:01Z"}).json()
        naive = http.get("/api/v1/services/digits/data", params={"since": "2026-12-07T10:00:01"})
    assert [len(page1["batches"]), len(page2["batches"]), page2["next"]] == [2, 1, None]
    assert {b["key"]["designation"] for b in page1["batches"] + page2["batches"]} == {"inputs"}
    # the batches whose records reach 10:00:01 or later: inputs 1 and 2, and the predictions
    assert len(late["batches"]) == 3
    assert page1["devices"]["edge-1"]["data_dropped_total"] == 7
    assert page1["devices"]["edge-1"]["data_spooled_bytes"] == 4096
    assert "zone" in _error(naive, 400)


def test_a_webhook_subscriber_hears_of_each_batch_received(hub: HubFactory, publisher: Publisher) -> None:
    receiver: Receiver = start_receiver()
    try:
        h = hub(webhook_poll_s=0.05)
        with h.client() as http:
            sub = http.post("/api/v1/webhooks", json={"url": receiver.url, "events": ["data.batch-received"]})
        assert sub.status_code == 201, sub.text
        receiver.secret = sub.json()["secret"]
        device = device_running(h, publisher, "edge-1", "digits")
        key = key_of("digits")
        body, _ = batch_of(key, 5)
        assert upload(h, device.token, key, body, records=5).status_code == 201
        [event] = receiver.wait_for(1)
    finally:
        assert receiver.server is not None
        receiver.server.shutdown()
    assert event["type"] == "edgepack.data.batch-received"
    assert event["subject"] == "services/digits/devices/edge-1"
    assert "5 records" in event["data"]["message"]


def test_the_cli_and_the_sdk_write_the_records_as_json_lines_under_azures_layout(
    hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    h = hub()
    device = device_running(h, publisher, "edge-1", "digits")
    inputs, predictions = key_of("digits"), key_of("digits", designation="predictions")
    inputs_body, inputs_records = batch_of(inputs, 30)  # 10:00:00 … 10:00:29
    predictions_body, predictions_records = batch_of(predictions, 4)
    assert upload(h, device.token, inputs, inputs_body, records=30).status_code == 201
    assert upload(h, device.token, predictions, predictions_body, records=4).status_code == 201
    with h.core.sessions.begin() as s:
        s.add(stored_telemetry("edge-1", "digits", spooled=0, dropped=7))
    with Hub(h.url, h.admin_token, progress=False) as connected:
        listing = Service(connected, "digits").get_data(designation="predictions")
    assert [(b.device_id, b.records) for b in listing.batches] == [("edge-1", 4)]
    assert listing.dropped() == {"edge-1": 7}
    with h.client() as http:  # the data outlives its service
        assert http.delete("/api/v1/deployments/digits").status_code == 200
    home = tmp_path / "home"
    day = "2026/12/07"

    everything = run(home, "service", "data", "digits", "--out", str(tmp_path / "all"), hub=h)
    late_inputs = run(
        home, "service", "data", "digits", "--designation", "inputs", "--since", "2026-12-07T10:00:20Z",
        "--out", str(tmp_path / "late"), "--json", hub=h,
    )  # fmt: skip
    wrong = run(
        home, "service", "data", "digits", "--since", "last tuesday", "--out", str(tmp_path / "x"), hub=h
    )

    assert everything.returncode == 0, everything.stderr
    assert "2 batches, 34 records" in everything.stdout
    assert "edge-1 dropped 7" in everything.stdout
    hex_inputs = digest_of(inputs_body).removeprefix("sha256:")
    written = tmp_path / "all" / "digits" / "digits" / "3" / "inputs" / day / f"edge-1-{hex_inputs}.jsonl"
    assert written.read_bytes() == lines(inputs_records)
    assert len(list((tmp_path / "all" / "digits" / "digits" / "3" / "predictions" / day).iterdir())) == 1
    late = ok_json(late_inputs)
    assert (late["batches"], late["records"]) == (1, 10)  # 10:00:20 … 10:00:29
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "'last tuesday'" in wrong.stderr
    assert not (tmp_path / "x").exists()

    with Hub(h.url, h.admin_token, progress=False) as connected:
        done = download_service_data(connected, "digits", tmp_path / "sdk", designation="predictions")
        listed = list_batches(connected.transport, "digits", DataFilter.of(device="edge-1"))
    assert (done.batches, done.records, done.dropped) == (1, 4, {"edge-1": 7})
    [file] = done.files
    records_back = [json.loads(line) for line in file.read_bytes().splitlines()]
    assert records_back == predictions_records
    assert [b.key.designation for b in listed.batches] == ["inputs", "predictions"]


def test_a_batch_is_spooled_to_disk_not_held_as_a_parsed_body(hub: HubFactory, publisher: Publisher) -> None:
    """A hub whose parsed-body bounds are 1 MiB still takes a 3.5 MiB batch: batches are read
    under their own bound (MAX_BATCH_BYTES) into a temp file, and hold none of the memory that
    JSON bodies share."""
    h = hub(max_body_mb=1, max_bodies_in_flight_mb=1)
    device = device_running(h, publisher, "edge-1", "digits")
    key = key_of("digits")
    body = gz(lines([record(key, i, data=os.urandom(450_000).hex()) for i in range(7)]))
    assert len(body) > 3 << 20
    assert upload(h, device.token, key, body, records=7).status_code == 201


def test_many_devices_uploading_full_batches_and_bombs_at_once_cost_the_hub_little_memory(
    hub_process: Callable[..., HubProcessUnderTest],  # noqa: F811  (the fixture)
    publisher: Publisher,
) -> None:
    """16 devices each send a full 8 MiB batch and a compression bomb, all at once, to a hub
    process of its own: batches are spooled to disk and unpacked a line at a time, so what the
    hub holds stays far below what it was sent (128 MiB of batches, 1.2 GiB of bombs unpacked)."""
    h = hub_process()
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    forge = Forge(publisher=publisher.key)
    devices = [f"edge-{n}" for n in range(16)]
    with httpx.Client(base_url=h.url, headers=admin, timeout=120) as http:
        files = default_files(2)
        assert http.post(
            "/api/v1/modules", content=forge.bundle(files=files, name="mod", version="1")
        ).is_success
        module = PushedModule("mod", "1", forge.module(files=files, name="mod", version="1"))
        tokens = [enroll(http, d).token for d in devices]
        assert deploy(http, "digits", module, devices=devices).status_code == 201
    key = key_of("digits")
    full = gz(lines([record(key, n, data=os.urandom(1_300_000).hex()) for n in range(5)]))
    bomb = gz(lines([record(key, n, data="a" * 1_500_000) for n in range(50)]))  # 75 MiB unpacked
    assert 7 << 20 < len(full) <= MAX_BATCH_BYTES

    def send(token: str, body: bytes, records: int) -> int:
        headers = {"Authorization": f"Bearer {token}", "Content-Encoding": "gzip",
                   "Content-Type": "application/x-ndjson", RECORDS_HEADER: str(records)}  # fmt: skip
        url = f"{h.url}{UPLOAD_PATH}/{digest_of(body)}?{key.query()}"
        return httpx.put(url, content=body, headers=headers, timeout=120).status_code

    with PeakRss(h) as rss, ThreadPoolExecutor(32) as pool:
        stored = list(pool.map(lambda t: send(t, full, 5), tokens))
        bombs = list(pool.map(lambda t: send(t, bomb, 50), tokens))
    print(
        f"\n16 x {len(full) / MIB:.1f} MiB batches and 16 bombs at once: RSS {rss.before / MIB:.0f} MiB -> "
        f"peak {rss.peak / MIB:.0f} MiB (growth {rss.growth / MIB:.1f} MiB, bound 64 MiB)"
    )
    assert stored == [201] * 16
    assert bombs == [413] * 16
    assert rss.growth < 64 * MIB, f"the hub grew by {rss.growth / MIB:.0f} MiB"


def test_the_admin_deletes_a_services_data_with_its_bytes_and_nothing_else(
    hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    h = hub()
    one = device_running(h, publisher, "edge-1", "digits")
    module = push(h, publisher, "digits-mod", "1")
    with h.client() as http:
        two = enroll(http, "edge-2")
        assert deploy(http, "digits", module, devices=["edge-1", "edge-2"]).status_code == 200
    other = device_running(h, publisher, "edge-3", "faces")
    digits, faces = key_of("digits"), key_of("faces")
    sent = {}
    for name, device, key in (("one", one, digits), ("two", two, digits), ("faces", other, faces)):
        sent[name], _ = batch_of(key, 2)
        assert upload(h, device.token, key, sent[name], records=2).status_code == 201
    home = tmp_path / "home"

    unasked = run(home, "service", "delete-data", "digits", "--device", "edge-1", hub=h)
    by_cli = run(home, "service", "delete-data", "digits", "--device", "edge-1", "--yes", hub=h)
    with Hub(h.url, h.admin_token, progress=False) as connected:
        by_sdk = Service(connected, "digits").delete_data()

    assert unasked.returncode == 2 and "--yes" in unasked.stderr
    assert by_cli.returncode == 0, by_cli.stderr
    assert "deleted 1 batches: the collected data of digits from edge-1" in by_cli.stdout
    assert by_sdk == 1  # edge-2's
    with h.client() as http:
        assert http.get("/api/v1/services/digits/data").json()["batches"] == []
        assert len(http.get("/api/v1/services/faces/data").json()["batches"]) == 1
    assert len(_stored_files(h)) == 1  # only faces' bytes are left


def test_a_delete_that_fails_half_way_leaves_nothing_it_cannot_find_again(
    hub: HubFactory, publisher: Publisher
) -> None:
    # The store refuses to delete one object (a file store's disk, S3 down for a moment): the
    # admin's delete fails, and the next one must still find and delete every batch's bytes.
    h = hub()
    device = device_running(h, publisher, "edge-1", "digits")
    key = key_of("digits")
    paths = []
    for count in (2, 3):
        body, _ = batch_of(key, count)
        paths.append(h.data_dir / "data" / upload(h, device.token, key, body, records=count).json()["path"])
    stuck = paths[0]
    stuck.unlink()
    (stuck / "in-the-way").mkdir(parents=True)  # unlink() of a folder fails
    with h.client() as http:
        failed = http.delete("/api/v1/services/digits/data")
    assert failed.status_code >= 500
    (stuck / "in-the-way").rmdir()
    stuck.rmdir()
    with h.client() as http:
        again = http.delete("/api/v1/services/digits/data")
    assert again.status_code == 200, again.text
    assert not paths[1].exists() and _stored_files(h) == [], "bytes left that no row names"
    assert _batches(h) == 0
