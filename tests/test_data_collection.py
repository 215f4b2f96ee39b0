"""Production data collection inside a module: Azure entry scripts, unchanged, collect through
edgepack's ``ModelDataCollector`` / ``Collector`` into the service's spool, run the way the
agent runs them (``python -m edge_agent.scoring`` with the agent's variables, real HTTP)."""

from __future__ import annotations

import gzip
import json
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.data.spool import ENV_DIR, ENV_SAMPLE_RATE, ENV_SERVICE, list_spool
from edge_agent.scoring.collector import Collection, CollectionSettings
from manifests.data import CollectedRecord
from tests.test_scoring_server import Server, make_module, serving, wait_ready

V1_SCRIPT = """
import json
import numpy as np
from azureml.monitoring import ModelDataCollector

def init():
    global inputs_dc, prediction_dc
    inputs_dc = ModelDataCollector("best_model", designation="inputs", feature_names=["a", "b"])
    prediction_dc = ModelDataCollector("best_model", designation="predictions", feature_names=["y"])

def run(raw_data):
    data = np.array(json.loads(raw_data)["data"])
    inputs_dc.collect(data)
    result = data.sum(axis=1)
    prediction_dc.collect(result)
    return result.tolist()
"""

V2_SCRIPT = """
import json
from azureml.ai.monitoring import Collector

def init():
    global inputs_collector, outputs_collector
    inputs_collector = Collector(name="model_inputs")
    outputs_collector = Collector(name="model_outputs")

def run(raw_data):
    rows = json.loads(raw_data)["data"]
    context = inputs_collector.collect({"rows": rows})
    result = [sum(r) for r in rows]
    outputs_collector.collect({"result": result}, context)
    return result
"""


@contextmanager
def ready(module: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """The module served and its init() done; stopped with SIGTERM (exit 0) at the end."""
    with serving(module, env=env) as server:
        wait_ready(server)
        yield server


def spool_env(folder: Path, **extra: str) -> dict[str, str]:
    return {ENV_DIR: str(folder), ENV_SERVICE: "fraud", **extra}


def read_spool(folder: Path) -> list[CollectedRecord]:
    records = []
    listing = list_spool(folder)
    for segment in listing.segments:
        lines = gzip.decompress(segment.path.read_bytes()).splitlines()
        assert len(lines) == segment.records, segment.name
        records += [CollectedRecord.model_validate_json(line) for line in lines]
    return records


def test_an_unchanged_azure_v1_script_collects_inputs_and_predictions_with_the_request_id(
    tmp_path: Path,
) -> None:
    module = make_module(tmp_path / "digits", V1_SCRIPT, {})
    spool = tmp_path / "spool"
    with ready(module, env=spool_env(spool)) as server:
        sent = []
        with httpx.Client(base_url=server.url) as client:
            for i in range(5):
                answer = client.post(
                    "/score", json={"data": [[i, 1], [2, 3]]}, headers={"x-ms-request-id": f"req-{i}"}
                )
                assert answer.status_code == 200, answer.text
                assert answer.headers["x-ms-request-id"] == f"req-{i}"
                sent.append(f"req-{i}")
            # No id, or one that is no valid id: the server makes one and says which.
            for headers in ({}, {"x-ms-request-id": "has space"}):
                answer = client.post("/score", json={"data": [[7, 7]]}, headers=headers)
                made = answer.headers["x-ms-request-id"]
                assert len(made) == 36 and made != "has space"
                sent.append(made)
            answer = client.post("/score", json={"data": [[1, 1]]}, headers={"x-request-id": "from-proxy"})
            assert answer.headers["x-ms-request-id"] == "from-proxy"
            sent.append("from-proxy")
    # Stopped with SIGTERM: what was in memory is on disk now.
    records = read_spool(spool)
    by_designation: dict[str, list[CollectedRecord]] = {}
    for record in records:
        by_designation.setdefault(record.designation, []).append(record)
    assert sorted(by_designation) == ["inputs", "predictions"]
    for kept in by_designation.values():
        assert [r.correlation_id for r in sorted(kept, key=lambda r: r.time)] == sent
        for record in kept:
            assert record.service == "fraud"
            assert record.model == "best_model"
            assert record.model_version == "1"  # no model_version given: the module's version
            assert record.time.utcoffset() is not None and abs(time.time() - record.time.timestamp()) < 300
    first = min(by_designation["inputs"], key=lambda r: r.time)
    assert first.data == [[0, 1], [2, 3]] and first.feature_names == ["a", "b"]
    assert min(by_designation["predictions"], key=lambda r: r.time).data == [1, 5]


def test_an_unchanged_azure_v2_script_ties_outputs_to_their_inputs(tmp_path: Path) -> None:
    module = make_module(tmp_path / "scorer", V2_SCRIPT, {})
    spool = tmp_path / "spool"
    with ready(module, env=spool_env(spool)) as server:
        answer = httpx.post(
            server.url + "/score", json={"data": [[1, 2]]}, headers={"x-ms-request-id": "abc"}
        )
        assert answer.json() == [3]
    records = {r.designation: r for r in read_spool(spool)}
    assert records["model_inputs"].data == {"rows": [[1, 2]]}
    assert records["model_outputs"].data == {"result": [3]}
    for record in records.values():
        assert record.correlation_id == "abc"
        assert (record.model, record.model_version) == ("scorer", "1")  # the module


def test_edgepacks_collector_wins_over_an_installed_azureml_package(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "azureml" / "monitoring").mkdir(parents=True)
    (site / "azureml" / "core.py").write_text("WORKSPACE = 'real'\n")
    (site / "azureml" / "monitoring" / "__init__.py").write_text(
        "raise RuntimeError('the real azureml.monitoring needs an AKS cluster')\n"
    )
    script = V1_SCRIPT.replace("import numpy as np", "import numpy as np\nfrom azureml.core import WORKSPACE")
    module = make_module(tmp_path / "digits", script, {})
    spool = tmp_path / "spool"
    env = spool_env(spool, PYTHONPATH=f"{site}:{Path.cwd()}")
    with ready(module, env=env) as server:
        assert httpx.post(server.url + "/score", json={"data": [[1, 2]]}).status_code == 200
    assert {r.designation for r in read_spool(spool)} == {"inputs", "predictions"}


def test_without_data_collection_collect_does_nothing(tmp_path: Path) -> None:
    module = make_module(tmp_path / "digits", V1_SCRIPT, {})
    with ready(module) as server:
        answer = httpx.post(server.url + "/score", json={"data": [[1, 2]]})
        assert answer.json() == [3] and answer.headers["x-ms-request-id"]
    assert not list(tmp_path.rglob("*.jsonl.gz"))


def test_sampling_keeps_about_the_rate_and_keeps_a_requests_records_together(tmp_path: Path) -> None:
    module = make_module(tmp_path / "digits", V1_SCRIPT, {})
    spool = tmp_path / "spool"
    calls = 2000
    env = spool_env(spool, **{ENV_SAMPLE_RATE: "0.05"})
    with ready(module, env=env) as server, httpx.Client(base_url=server.url) as client:
        for i in range(calls):
            client.post("/score", content=b'{"data": [[1, 2]]}', headers={"x-ms-request-id": f"r{i}"})
    records = read_spool(spool)
    inputs = {r.correlation_id for r in records if r.designation == "inputs"}
    predictions = {r.correlation_id for r in records if r.designation == "predictions"}
    # Binomial(2000, 0.05): mean 100, standard deviation 9.7; 20..200 is over 8 of them away.
    assert 20 <= len(inputs) <= 200
    assert inputs == predictions  # one decision per request


def test_data_that_is_no_json_or_too_large_is_dropped_and_counted_never_raised(tmp_path: Path) -> None:
    script = """
from azureml.monitoring import ModelDataCollector
dc = ModelDataCollector("m", designation="inputs")
def run(raw_data):
    dc.collect(object())
    dc.collect("x" * (2 << 20))
    dc.collect({"ok": True})
    return "fine"
"""
    module = make_module(tmp_path / "odd", script, {})
    spool = tmp_path / "spool"
    with ready(module, env=spool_env(spool)) as server:
        answer = httpx.post(server.url + "/score", content=b"{}")
        assert answer.status_code == 200 and answer.json() == "fine"
    log = server.log()
    assert [r.data for r in read_spool(spool)] == [{"ok": True}]
    assert "data collection dropped records" in log and "not JSON" in log


def _collection(tmp_path: Path, **settings: Any) -> Collection:
    return Collection(
        CollectionSettings(folder=tmp_path / "spool", service="svc", **settings),
        module_name="m",
        module_version="1",
    )


def test_a_full_queue_drops_and_counts_and_never_blocks_the_caller(tmp_path: Path) -> None:
    collection = _collection(tmp_path, max_queued_records=50)
    calls = 100_000
    for i in range(calls):
        collection.collect(i, model="m", model_version="1", designation="inputs", correlation_id=None)
    collection.close()
    dropped = collection.dropped.by_cause["queue-full"]
    assert dropped > 0 and collection.kept + dropped == calls
    on_disk = [json.loads(line)["data"] for r in list_spool(tmp_path / "spool").segments
               for line in gzip.decompress(r.path.read_bytes()).splitlines()]  # fmt: skip
    assert len(on_disk) == collection.kept and on_disk == sorted(on_disk)


def test_the_request_context_reaches_collect_in_a_thread_run_with_the_context(tmp_path: Path) -> None:
    import asyncio
    import contextvars

    from edge_agent.scoring import azureml_shim, collector

    seen: list[str | None] = []

    def run() -> None:
        request = collector.CURRENT_REQUEST.get()
        seen.append(request.correlation_id if request else None)

    async def score() -> None:
        collector.CURRENT_REQUEST.set(collector.RequestContext("in-task"))
        await asyncio.to_thread(run)
        thread = threading.Thread(target=contextvars.copy_context().run, args=(run,))
        thread.start()
        thread.join()

    asyncio.run(score())
    assert seen == ["in-task", "in-task"]
    assert azureml_shim.ModelDataCollector("m").collect([1]) == {"correlation_id": None}
    given = azureml_shim.ModelDataCollector("m").collect([1], user_correlation_id="mine")
    assert given == {"correlation_id": "mine"}


def test_a_spool_over_its_hard_cap_drops_the_newest_while_the_agent_is_away(tmp_path: Path) -> None:
    collection = _collection(tmp_path, quota_bytes=4096, segment_max_records=10)
    noise = [random.Random(i).random() for i in range(50)]  # incompressible enough
    for i in range(200):
        collection.collect(noise, model="m", model_version="1", designation="inputs", correlation_id=str(i))
    collection.close()
    listing = list_spool(tmp_path / "spool")
    assert listing.bytes <= 4096 * 1.25
    kept = sum(s.records for s in listing.segments)
    assert kept + collection.dropped.by_cause["spool-full"] == 200 and kept > 0


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("the scoring server runs on Linux")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_segments_close_by_age_and_gather_longer_while_the_hub_is_out_of_reach(tmp_path: Path) -> None:
    clock = _Clock()
    settings = CollectionSettings(folder=tmp_path / "spool", service="svc")
    collection = Collection(settings, module_name="m", module_version="1", clock=clock)

    def collect_and_drain() -> int:
        collection.collect(1, model="m", model_version="1", designation="inputs", correlation_id=None)
        collection.writer.drain()
        return len(list_spool(settings.folder).segments)

    assert collect_and_drain() == 0
    clock.now += settings.segment_max_age_s
    collection.writer.drain()
    assert len(list_spool(settings.folder).segments) == 1  # online: closed after 10 s
    for n in range(15):  # 16 segments wait: the hub is out of reach
        write_segment = settings.folder / f"{n + 1:020d}-1-000001-1.jsonl.gz"
        write_segment.write_bytes(gzip.compress(b"{}\n"))
    assert collect_and_drain() == 16
    clock.now += settings.segment_max_age_s
    collection.writer.drain()
    assert len(list_spool(settings.folder).segments) == 16  # still gathering
    clock.now += settings.backlog_max_age_s
    collection.writer.drain()
    assert len(list_spool(settings.folder).segments) == 17
    collection.close()


def test_each_worker_writes_its_own_segments_and_flushes_them_on_sigterm(tmp_path: Path) -> None:
    module = make_module(tmp_path / "digits", V1_SCRIPT, {})
    spool = tmp_path / "spool"
    state = tmp_path / "instance.json"  # written once every worker is ready (as the agent runs it)
    env = spool_env(spool, EDGEPACK_PRELOAD="1", EDGEPACK_REUSE_PORT="1", EDGEPACK_STATE_FILE=str(state))
    with serving(module, workers=2, env=env) as server:
        deadline = time.monotonic() + 30
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(40):  # a connection each: the kernel spreads them over both workers
            answer = httpx.post(
                server.url + "/score", json={"data": [[i, 0]]}, headers={"x-ms-request-id": f"w{i}"}
            )
            assert answer.status_code == 200
    records = read_spool(spool)
    assert sorted(r.correlation_id or "" for r in records) == sorted(
        f"w{i}" for i in range(40) for _ in range(2)
    )
    assert len({s.pid for s in list_spool(spool).segments}) == 2


def test_a_record_is_queued_under_the_day_of_its_own_time_when_calls_interleave_at_midnight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two collect() calls interleaved across midnight UTC (threads of a script; here the data's
    # own tolist() collects, which interleaves the same way, deterministically). The hub refuses
    # a whole batch with one record of another day, and the agent then drops the segment.
    import edge_agent.scoring.collector as collector_module

    midnight = 1_796_688_000.0  # 2026-12-08T00:00:00Z
    times = iter([midnight - 0.5, midnight + 0.5])

    real = time

    class FakeTime:
        monotonic = staticmethod(real.monotonic)
        time_ns = staticmethod(real.time_ns)

        @staticmethod
        def time() -> float:
            return next(times)

    monkeypatch.setattr(collector_module, "time", FakeTime)
    collection = _collection(tmp_path)
    kwargs: dict[str, Any] = {
        "model": "m",
        "model_version": "1",
        "designation": "inputs",
        "correlation_id": None,
    }

    class Rows:
        def tolist(self) -> list[int]:
            collection.collect("after midnight", **kwargs)
            return [1]

    collection.collect(Rows(), **kwargs)
    queued = collection.take_queued()
    assert len(queued) == 2
    for (_model, _version, _designation, day), line in queued:
        assert CollectedRecord.model_validate_json(line).time.date() == day, line
