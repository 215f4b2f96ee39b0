"""The agent's data uploader against a real HTTP endpoint that implements the hub's contract
(tests/agent/data_hub.py): batches go oldest first and leave the spool once stored; the hub's
answers (201, 200, 429, 500, 403) are followed; a device offline keeps everything within its
quota and loses nothing when the hub is back; an agent killed mid-upload resumes without
storing a batch twice; over the quota the oldest records go, counted exactly."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.data.spool import list_spool, spool_dir
from edge_agent.data.uploader import SpoolFigures, Uploader, UploaderSettings
from edge_agent.health import Watched
from edge_agent.report.sampler import Sampler
from edge_agent.scoring.collector import Collection, CollectionSettings
from edge_agent.state.records import InstanceRecord
from edge_agent.uplink.http import HubHttp
from manifests.compat import encode_for_hub
from manifests.desired import DeploymentSettings, ModuleAssignment, RuntimeKind
from manifests.durable import write_durable
from tests.agent.data_hub import DataHub, segments_in
from tests.test_scoring_server import make_module, serving

SERVICE = "fraud"


def spool_records(state_dir: Path, count: int, *, start: int = 0, per_segment: int = 10) -> None:
    """``count`` records collected the way a module does, ``per_segment`` to a segment."""
    settings = CollectionSettings(
        folder=spool_dir(state_dir, SERVICE), service=SERVICE, segment_max_records=per_segment
    )
    collection = Collection(settings, module_name="m", module_version="1")
    for i in range(start, start + count):
        collection.collect(
            {"i": i}, model="m", model_version="1", designation="inputs", correlation_id=f"c{i}"
        )
    collection.close()
    assert collection.dropped.total() == 0


@pytest.fixture
def hub() -> Iterator[DataHub]:
    hub = DataHub().start()
    yield hub
    hub.stop()
    assert hub.problems == []


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def uploader(
    state_dir: Path, hub: DataHub, clock: Clock, *, quota: int = 1 << 30, **settings: float
) -> tuple[Uploader, HubHttp]:
    http = HubHttp(hub.credentials(), timeout_s=5)
    up = Uploader(
        state_dir,
        http.put_batch,
        lambda: {SERVICE: quota},
        settings=UploaderSettings(**settings),  # type: ignore[arg-type]
        clock=clock,
        rand=lambda: 0.5,
    )
    return up, http


def ids(hub: DataHub) -> list[int]:
    return sorted(r.data["i"] for r in hub.records())


def test_batches_go_oldest_first_and_leave_the_spool_once_stored(tmp_path: Path, hub: DataHub) -> None:
    spool_records(tmp_path, 50)
    names = [p.name for p in segments_in(tmp_path, SERVICE)]
    assert len(names) == 5
    up, http = uploader(tmp_path, hub, Clock())
    up.scan()
    http.close()
    assert segments_in(tmp_path, SERVICE) == []
    assert [status for _, status in hub.log] == [201] * 5
    sent_order = [digest for digest, _ in hub.log]
    first_ids = [hub.stored[d][1][0].data["i"] for d in sent_order]
    assert first_ids == sorted(first_ids)  # oldest first
    assert ids(hub) == list(range(50))
    assert up.uploaded == 5 and up.figures()[SERVICE].spooled_bytes == 0


def test_the_hubs_answers_are_followed(tmp_path: Path, hub: DataHub) -> None:
    spool_records(tmp_path, 40)  # 4 segments
    clock = Clock()
    up, http = uploader(tmp_path, hub, clock, backoff_base_s=2.0, backoff_cap_s=60.0)
    # 500: later, with a full-jitter backoff; nothing is lost.
    hub.answers.append((500, {}))
    up.scan()
    assert len(segments_in(tmp_path, SERVICE)) == 4 and hub.stored == {}
    clock.now += 0.9  # rand 0.5 x 2 s: not yet
    up.scan()
    assert len(hub.log) == 1
    # 429 with Retry-After: the hub's wish wins over a shorter backoff.
    clock.now += 0.2
    hub.answers.append((429, {"Retry-After": "30"}))
    up.scan()
    clock.now += 29
    up.scan()
    assert len(hub.log) == 2
    # 403: refused for good: dropped, counted, the next one goes on.
    clock.now += 2
    hub.answers.append((403, {}))
    up.scan()
    assert up.refused == 1
    assert [s for _, s in hub.log] == [500, 429, 403, 201, 201, 201]
    assert ids(hub) == list(range(10, 40))
    assert segments_in(tmp_path, SERVICE) == []
    http.close()


def test_a_retry_after_of_other_digits_than_ascii_is_a_backoff_not_a_crash(
    tmp_path: Path, hub: DataHub
) -> None:
    # str.isdigit() says yes to '²' (a proxy's or a broken hub's header), which float() refuses:
    # the scan failed, and without a backoff the batch went again at the next scan.
    spool_records(tmp_path, 10)
    clock = Clock()
    up, http = uploader(tmp_path, hub, clock, backoff_base_s=2.0, backoff_cap_s=60.0)
    hub.answers.append((429, {"Retry-After": "\xb2"}))
    up.scan()
    clock.now += 0.5  # within the backoff (rand 0.5 x 2 s)
    up.scan()
    assert [s for _, s in hub.log] == [429]
    clock.now += 1
    up.scan()
    assert [s for _, s in hub.log] == [429, 201]
    http.close()


def test_a_batch_the_hub_stored_before_is_answered_200_and_stored_once(tmp_path: Path, hub: DataHub) -> None:
    spool_records(tmp_path, 10)
    [segment] = segments_in(tmp_path, SERVICE)
    kept = segment.read_bytes()
    up, http = uploader(tmp_path, hub, Clock())
    up.scan()
    # The agent died after the hub stored it and before it deleted it: the file is back.
    write_durable(segment, kept)
    up.scan()
    http.close()
    assert [s for _, s in hub.log] == [201, 200]
    assert len(hub.stored) == 1 and segments_in(tmp_path, SERVICE) == []


def test_offline_for_a_while_then_back_nothing_is_lost_nothing_stored_twice(
    tmp_path: Path, hub: DataHub
) -> None:
    clock = Clock()
    up, http = uploader(tmp_path, hub, clock, backoff_cap_s=10.0)
    hub.stop()  # the device goes offline
    for round_ in range(6):
        spool_records(tmp_path, 30, start=round_ * 30)
        up.scan()
        clock.now += 11
    assert len(segments_in(tmp_path, SERVICE)) == 18 and hub.log == []
    hub.start()  # back, on the same address
    for _ in range(3):
        up.scan()
        clock.now += 11
    http.close()
    assert ids(hub) == list(range(180))
    digests = [d for d, s in hub.log if s == 201]
    assert len(digests) == len(set(digests)) == 18
    assert segments_in(tmp_path, SERVICE) == []


def test_over_its_quota_the_spool_drops_the_oldest_and_counts_them_exactly(
    tmp_path: Path, hub: DataHub
) -> None:
    hub.stop()  # offline the whole time
    spool_records(tmp_path, 200, per_segment=10)  # 20 segments
    segments = list_spool(spool_dir(tmp_path, SERVICE)).segments
    newest = segments[-5:]
    quota = sum(s.size for s in newest)
    clock = Clock()
    up, http = uploader(tmp_path, hub, clock, quota=quota)
    up.scan()
    clock.now += 1000
    up.scan()
    http.close()
    assert [p.name for p in segments_in(tmp_path, SERVICE)] == [s.name for s in newest]
    figures = up.figures()[SERVICE]
    assert figures.dropped_total == 150
    assert figures.spooled_bytes == quota
    # The records kept are the newest ones.
    kept = [int(line.split(b'"i":')[1].split(b"}")[0]) for s in newest
            for line in gzip.decompress(s.path.read_bytes()).splitlines()]  # fmt: skip
    assert sorted(kept) == list(range(150, 200))


def test_what_the_module_left_that_is_no_segment_is_removed_never_sent(tmp_path: Path, hub: DataHub) -> None:
    spool_records(tmp_path, 10)
    folder = spool_dir(tmp_path, SERVICE)
    secret = tmp_path / "secret"
    secret.write_text("the device's secret")
    (folder / "00000000000000000001-1-000001-1.jsonl.gz").symlink_to(secret)
    (folder / "notes.txt").write_text("x")
    (folder / "00000000000000000003-1-000001-1.jsonl.gz").write_bytes(b"not gzip at all")
    # A segment of another service's records, placed in this one's spool.
    (folder / "00000000000000000002-1-000001-1.jsonl.gz").write_bytes(
        gzip.compress(b'{"time":"2026-01-01T00:00:00Z","service":"payroll","model":"m",'
                      b'"model_version":"1","designation":"inputs","data":1}\n')
    )  # fmt: skip
    up, http = uploader(tmp_path, hub, Clock())
    up.scan()
    http.close()
    assert secret.read_text() == "the device's secret"
    assert os.listdir(folder) == []
    assert up.damaged == 2 and ids(hub) == list(range(10))
    assert all(r.service == SERVICE for r in hub.records())


UPLOADER_PROCESS = """
import sys, time
from pathlib import Path
from edge_agent.data.uploader import SpoolFigures, Uploader, UploaderSettings
from edge_agent.health import Watched
from edge_agent.report.sampler import Sampler
from edge_agent.uplink.http import HubHttp
from manifests.device import DeviceCredentials

credentials = DeviceCredentials.model_validate_json(Path(sys.argv[2]).read_text())
http = HubHttp(credentials, timeout_s=5)
up = Uploader(Path(sys.argv[1]), http.put_batch, lambda: {"fraud": 1 << 30},
              settings=UploaderSettings(scan_interval_s=0.05, backoff_cap_s=0.5))
up.start()
time.sleep(3600)
"""


def test_an_agent_killed_mid_upload_resumes_and_stores_no_batch_twice(tmp_path: Path, hub: DataHub) -> None:
    spool_records(tmp_path, 200)  # 20 segments
    creds = tmp_path / "credentials.json"
    creds.write_text(hub.credentials().model_dump_json())
    hub.delay_s = 0.1  # stored, then a moment before the answer: a window to die in

    def agent() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", UPLOADER_PROCESS, str(tmp_path), str(creds)],
            env={**os.environ, "PYTHONPATH": str(Path.cwd())},
        )

    first = agent()
    deadline = time.monotonic() + 60
    while len(hub.stored) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert 5 <= len(hub.stored) < 20
    second = agent()
    try:
        deadline = time.monotonic() + 60
        while segments_in(tmp_path, SERVICE) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        second.kill()
        second.wait()
    assert segments_in(tmp_path, SERVICE) == []
    assert ids(hub) == list(range(200))  # each record stored once
    assert len([d for d, s in hub.log if s == 201]) == 20


@pytest.mark.parametrize("status", [401, 404, 405])
def test_answers_that_do_not_blame_the_batch_keep_it_for_later(
    tmp_path: Path, hub: DataHub, status: int
) -> None:
    # 401: the device's token; 404/405: a hub older than the upload route (devices first).
    spool_records(tmp_path, 10)
    clock = Clock()
    up, http = uploader(tmp_path, hub, clock)
    hub.answers.append((status, {}))
    up.scan()
    assert len(segments_in(tmp_path, SERVICE)) == 1 and up.refused == 0
    clock.now += 1000
    up.scan()
    http.close()
    assert [s for _, s in hub.log] == [status, 201] and segments_in(tmp_path, SERVICE) == []


def test_telemetry_carries_each_collecting_modules_spool_figures(tmp_path: Path) -> None:
    module = make_module(tmp_path / "m", "def run(raw):\n    return 1\n", {})
    with serving(module) as server:
        port = int(server.url.rsplit(":", 1)[1])
        assignment = ModuleAssignment(
            service=SERVICE,
            module="m",
            version="1",
            manifest_digest="sha256:" + "1" * 64,
            settings=DeploymentSettings(port=port),
        )
        instance = InstanceRecord(
            id="1-a", assignment=assignment, key="k", runtime=RuntimeKind.PROCESS, run_dir=str(tmp_path),
            started_at=datetime.now(UTC), probe_port=port,
        )  # fmt: skip
        sampler = Sampler(
            "edge-1",
            {},
            lambda: [Watched(SERVICE, instance)],
            lambda _: None,
            interval_s=1,
            hub_reads_newer=lambda: True,
            spools=lambda: {SERVICE: SpoolFigures(spooled_bytes=4096, dropped_total=150)},
        )
        sample = sampler.sample()
    [metrics] = sample.modules
    assert (metrics.data_spooled_bytes, metrics.data_dropped_total) == (4096, 150)
    # A hub that does not read the newer fields does not get them.
    old_hub = json.loads(encode_for_hub(sample, hub_reads_newer=False))
    assert "data_spooled_bytes" not in old_hub["modules"][0]


def test_a_removed_services_spool_is_uploaded_then_its_folder_goes(tmp_path: Path, hub: DataHub) -> None:
    spool_records(tmp_path, 30)
    clock = Clock()
    http = HubHttp(hub.credentials(), timeout_s=5)
    up = Uploader(tmp_path, http.put_batch, dict, clock=clock, rand=lambda: 0.5)  # assigned: nothing
    folder = spool_dir(tmp_path, SERVICE)
    stale = folder / ".00000000000000000001-1-000001-1.jsonl.gz.1.abcd.tmp"
    stale.write_bytes(b"half a segment")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # its writer died an hour ago
    up.scan()
    http.close()
    assert ids(hub) == list(range(30)) and not stale.exists()
    up.scan()
    clock.now += up.settings.remove_empty_after_s - 1
    up.scan()
    assert folder.is_dir()  # an instance may still be draining into it
    clock.now += 1
    up.scan()
    assert not folder.exists() and up.figures() == {}
