"""The scoring server, run the way the agent runs it: ``python -m edge_agent.scoring`` in its
own process, real uvicorn on a loopback port, real onnxruntime, real HTTP.

Each server gets its own module directory and port, so the tests are safe under xdist. Every
server is stopped with SIGTERM at the end and must then exit 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.report.telemetry import Reading, module_metrics
from edge_agent.scoring.metrics import BUCKETS_S, MetricsBoard, latency_quantile, parse, render
from manifests.bundle import verify_bundle
from tests.conftest import EXAMPLE, Publisher, free_port
from tests.engines import EngineFailed, start_on_free_ports

START_TIMEOUT_S = 30.0



def make_module(root: Path, script: str, models: dict[str, bytes | Path]) -> Path:
    """Lay out a module directory by hand: module.json, src/score.py, model/<files>."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "score.py").write_text(script)
    for name, content in models.items():
        target = root / "model" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copy(content, target)
        else:
            target.write_bytes(content)
    signed = {"name": root.name, "version": "1", "entry_script": "src/score.py"}
    (root / "module.json").write_text(json.dumps({"signed": signed, "signatures": []}))
    return root


class _MemorySink:
    """Keeps verified blobs in memory: enough to unpack a small bundle for a test."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def has(self, digest: str) -> bool:
        return digest in self.blobs

    def begin(self, digest: str, size: int) -> _MemoryWriter:
        return _MemoryWriter(self, digest)


class _MemoryWriter:
    def __init__(self, sink: _MemorySink, digest: str) -> None:
        self.sink = sink
        self.digest = digest
        self.chunks: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def commit(self) -> None:
        self.sink.blobs[self.digest] = b"".join(self.chunks)

    def abort(self) -> None:
        self.chunks.clear()


def unpack_bundle(bundle: Path, publisher: Publisher, root: Path) -> Path:
    sink = _MemorySink()
    with bundle.open("rb") as fh:
        verified = verify_bundle(fh, publisher.trust, sink=sink)
    for entry in verified.manifest.files:
        target = root / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(sink.blobs[entry.digest])
    (root / "module.json").write_bytes(verified.manifest_bytes)
    return root


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


def start_server(module_dir: Path, *, workers: int = 1, env: dict[str, str] | None = None) -> Server:
    def launch(ports: list[int]) -> Server:
        port = ports[0]
        stderr = module_dir.parent / f"{module_dir.name}-{port}.stderr"
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.scoring", "--module-dir", str(module_dir),
             "--port", str(port), "--workers", str(workers)],
            stdout=subprocess.DEVNULL,
            stderr=stderr.open("wb"),
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        server = Server(f"http://127.0.0.1:{port}", proc, stderr)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EngineFailed(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.url + "/", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                time.sleep(0.05)
        proc.kill()
        raise AssertionError(f"server did not answer within {START_TIMEOUT_S}s:\n{server.log()}")

    return start_on_free_ports("the scoring server", 1, launch)


def stop_server(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        raise AssertionError(f"server ignored SIGTERM:\n{server.log()}") from None


@contextmanager
def serving(module_dir: Path, **kwargs: Any) -> Iterator[Server]:
    server = start_server(module_dir, **kwargs)
    try:
        yield server
    finally:
        code = stop_server(server)
    assert code == 0, f"server exited with {code} after SIGTERM:\n{server.log()}"


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        r = httpx.get(server.url + "/healthz")
        if r.status_code == 200:
            return
        assert r.status_code == 503, r.text
        time.sleep(0.05)
    raise AssertionError(f"module never became ready:\n{server.log()}")


def metric(text: str, name: str) -> float:
    """The value of one Prometheus sample line (``name`` with its labels), 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


TOY_SCRIPT = """
import json, os

def init():
    global greeting
    greeting = "ready"

def run(raw_data):
    request = json.loads(raw_data)
    if request.get("fail"):
        raise ValueError("asked to fail")
    if request.get("crash"):
        os._exit(3)
    if request.get("as_text"):
        return json.dumps({"text": True})
    return {"echo": request, "pid": os.getpid(), "greeting": greeting,
            "model_dir": os.environ["AZUREML_MODEL_DIR"], "cwd": os.getcwd()}
"""


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    module = make_module(tmp_path_factory.mktemp("toy") / "toy", TOY_SCRIPT, {"m.bin": b"x"})
    with serving(module, env={"EDGEPACK_MAX_BODY_BYTES": "4096"}) as server:
        wait_ready(server)
        yield server


# --- the digits example -----------------------------------------------------------------------


def test_stock_azure_script_from_a_signed_bundle_predicts_what_sklearn_predicts(
    tmp_path: Path,
    digits_bundle: Path,
    publisher: Publisher,
    digits_samples: dict[str, list[Any]],
) -> None:
    module = unpack_bundle(digits_bundle, publisher, tmp_path / "digits")
    assert (module / "src" / "score.py").read_bytes() == (EXAMPLE / "score.py").read_bytes()
    with serving(module) as server:
        wait_ready(server)
        assert httpx.get(server.url + "/").text == "Healthy"
        r = httpx.post(
            server.url + "/score",
            json={"data": digits_samples["data"]},
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json()["predictions"] == digits_samples["expected"]
        # One sample at a time over one keep-alive connection, as a device's client would.
        with httpx.Client(base_url=server.url) as client:
            for row, expected in list(zip(digits_samples["data"], digits_samples["expected"], strict=True))[
                :5
            ]:
                body = client.post("/score", content=json.dumps({"data": [row]})).json()
                assert body["predictions"] == [expected]
                assert 0 < body["confidence"][0] <= 1
        swagger = httpx.get(server.url + "/swagger.json").json()
        assert swagger["openapi"].startswith("3.")
        assert swagger["info"] == {
            "title": "digits",
            "description": "Scoring API of the edgepack module digits",
            "version": "1",
        }
        assert swagger["components"]["schemas"]["ServiceInput"] == {"type": "object", "example": {}}


def test_inference_schema_script_gets_typed_input_and_publishes_its_schema(
    tmp_path: Path, digits_model: Path, digits_samples: dict[str, list[Any]]
) -> None:
    script = (EXAMPLE / "score_schema.py").read_text()
    module = make_module(tmp_path / "digits-schema", script, {"digits.onnx": digits_model / "digits.onnx"})
    with serving(module) as server:
        wait_ready(server)
        r = httpx.post(server.url + "/score", json={"data": digits_samples["data"]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == digits_samples["expected"]

        schemas = httpx.get(server.url + "/swagger.json").json()["components"]["schemas"]
        service_input = schemas["ServiceInput"]
        assert service_input["properties"]["data"]["format"] == "numpy.ndarray"
        example = service_input["example"]["data"]
        assert len(example) == 1 and len(example[0]) == 64
        assert example[0][:4] == [0.0, 0.0, 5.0, 13.0]
        assert schemas["ServiceOutput"]["example"] == {"predictions": [0], "confidence": [0.9987]}
        assert schemas["ServiceOutput"]["required"] == ["predictions", "confidence"]

        # Decorated run() takes its parameters from a JSON object, as on Azure ML.
        for bad, why in [
            (b"[1, 2]", "must be a JSON object"),
            (b"{not json", "not valid JSON"),
            (b'{"rows": []}', "no value for 'data'"),
        ]:
            r = httpx.post(server.url + "/score", content=bad)
            assert r.status_code == 400, r.text
            assert r.json()["type"] == "BadInput"
            assert why in r.json()["error"]


# --- readiness, errors, limits, metrics ---------------------------------------------------------


def test_healthz_is_503_until_init_finishes_then_200(tmp_path: Path) -> None:
    release = tmp_path / "release"
    script = f"""
import os, time
from pathlib import Path

def init():
    # Waits for the test to say so: readiness is observed before and after, without timing.
    while not Path({str(release)!r}).exists():
        time.sleep(0.02)

def run(raw_data):
    return "scored"
"""
    module = make_module(tmp_path / "slow", script, {"m.bin": b"x"})
    with serving(module) as server:
        r = httpx.get(server.url + "/healthz")
        assert (r.status_code, r.json()) == (503, {"status": "starting"})
        r = httpx.post(server.url + "/score", content=b"{}")
        assert r.status_code == 503
        assert r.json()["type"] == "NotReady"
        assert httpx.get(server.url + "/").text == "Healthy"  # alive, though not ready

        release.touch()
        wait_ready(server)
        assert httpx.get(server.url + "/healthz").json() == {"status": "ready"}
        r = httpx.post(server.url + "/score", content=b"{}")
        assert (r.status_code, r.json()) == (200, "scored")


def test_run_raising_gives_500_json_and_the_server_keeps_serving(toy_server: Server) -> None:
    url = toy_server.url + "/score"
    before = httpx.get(toy_server.url + "/metrics").text

    r = httpx.post(url, json={"fail": True})
    assert r.status_code == 500
    assert r.json() == {"error": "asked to fail", "type": "ValueError"}
    assert "Traceback" in toy_server.log() and "asked to fail" in toy_server.log()

    r = httpx.post(url, json={"n": 1})
    assert r.status_code == 200
    assert r.json()["echo"] == {"n": 1}

    after = httpx.get(toy_server.url + "/metrics").text
    assert metric(after, "edgepack_errors_total") == metric(before, "edgepack_errors_total") + 1
    ok = 'edgepack_requests_total{route="score",status="200"}'
    failed = 'edgepack_requests_total{route="score",status="500"}'
    assert metric(after, ok) == metric(before, ok) + 1
    assert metric(after, failed) == metric(before, failed) + 1


def test_the_entry_script_sees_the_azure_environment(toy_server: Server, tmp_path: Path) -> None:
    body = httpx.post(toy_server.url + "/score", content=b'{"n": 2}').json()
    assert body["greeting"] == "ready"  # init() ran before run()
    assert body["model_dir"].endswith("/toy/model")
    assert body["cwd"].endswith("/toy/src")
    # A run() that returns a JSON string is answered as Azure's server answers it: a JSON string.
    r = httpx.post(toy_server.url + "/score", json={"as_text": True})
    assert r.json() == '{"text": true}'
    # GET /score takes the input from the query string, as on Azure ML.
    r = httpx.get(toy_server.url + "/score", params=[("n", "5"), ("tag", "a"), ("tag", "[1]")])
    assert r.status_code == 200, r.text
    assert r.json()["echo"] == {"n": 5, "tag": ["a", [1]]}


def test_bad_requests_get_4xx_json(toy_server: Server) -> None:
    url = toy_server.url
    r = httpx.post(url + "/score", content=b"x" * 5000)
    assert r.status_code == 413
    assert r.json()["type"] == "PayloadTooLarge"
    r = httpx.post(url + "/score", content=b"\xff\xfe{}")
    assert r.status_code == 400
    assert "UTF-8" in r.json()["error"]
    r = httpx.delete(url + "/score")
    assert r.status_code == 405
    r = httpx.get(url + "/nowhere")
    assert (r.status_code, r.json()["type"]) == (404, "NotFound")
    # Still serving after all of that.
    assert httpx.post(url + "/score", json={"n": 3}).status_code == 200


def test_metrics_count_requests_and_latency(toy_server: Server) -> None:
    before = httpx.get(toy_server.url + "/metrics").text
    with httpx.Client(base_url=toy_server.url) as client:
        for i in range(7):
            assert client.post("/score", json={"i": i}).status_code == 200
    r = httpx.get(toy_server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = r.text
    ok = 'edgepack_requests_total{route="score",status="200"}'
    assert metric(after, ok) == metric(before, ok) + 7
    count = "edgepack_score_duration_seconds_count"
    assert metric(after, count) == metric(before, count) + 7
    inf = 'edgepack_score_duration_seconds_bucket{le="+Inf"}'
    assert metric(after, inf) == metric(after, count)
    assert metric(after, "edgepack_score_duration_seconds_sum") > 0
    assert metric(after, "edgepack_workers") == 1
    assert metric(after, "edgepack_ready_workers") == 1
    totals = parse(after)
    assert totals.count == sum(totals.buckets) == metric(after, count)
    p50 = latency_quantile(totals.buckets, 0.5)
    assert p50 is not None and 0 < p50 <= BUCKETS_S[-1]


SLOW_SCRIPT = """
import time

def run(raw_data):
    time.sleep(0.02)
    return {"ok": True}
"""


def test_the_modules_own_run_time_is_reported_apart_from_the_request_around_it(tmp_path: Path) -> None:
    # Each body arrives in two parts 100 ms apart: the request's latency holds that wait (as
    # it holds a slow client, parsing or a queue), run()'s own time does not.
    module = make_module(tmp_path / "slow", SLOW_SCRIPT, {"m.bin": b"x"})

    def slow_body() -> Iterator[bytes]:
        yield b'{"a": '
        time.sleep(0.1)
        yield b"1}"

    with serving(module) as server:
        wait_ready(server)
        before = Reading("i-1", time.monotonic(), parse(httpx.get(server.url + "/metrics").text))
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(5):
                assert client.post("/score", content=slow_body()).status_code == 200
        text = httpx.get(server.url + "/metrics").text
        now = Reading("i-1", time.monotonic(), parse(text))
    assert metric(text, "edgepack_run_duration_seconds_count") == 5
    sample = module_metrics("slow", before, now)
    assert sample.run_p50_ms is not None and sample.run_p95_ms is not None and sample.p50_ms is not None
    assert 10 <= sample.run_p50_ms <= sample.run_p95_ms < 50  # run() sleeps 20 ms
    assert sample.p50_ms >= 100  # the wait for the body's second part


def test_the_metrics_of_a_server_older_than_the_agent_still_read() -> None:
    # A module's image may carry a scoring server from before run() was timed: its /metrics
    # has no run histogram, and the agent still samples its requests and latency.
    board = MetricsBoard(1)
    board.worker(0).score(200, 150_000)
    older = "\n".join(line for line in render(board.totals()).decode().splitlines() if "_run_" not in line)
    totals = parse(older)
    assert totals.count == 1 and totals.run_count == 0 and sum(totals.run_buckets) == 0
    sample = module_metrics("svc", Reading("i-1", 1.0, totals), Reading("i-1", 2.0, totals))
    assert sample.requests_total == 1 and sample.run_p95_ms is None


def test_metrics_of_several_workers_add_up_and_read_back() -> None:
    board = MetricsBoard(2)
    first, second = board.worker(0), board.worker(1)
    for _ in range(3):
        first.score(200, 150_000)  # 150 us
    second.score(200, 400_000)
    second.score(500, 2_000_000)
    second.error()
    first.run(120_000)
    second.run(1_500_000)
    first.request(1, 404)
    second.mark_ready()
    totals = parse(render(board.totals()).decode())
    assert totals == board.totals()
    assert totals.requests[("score", "200")] == 4
    assert totals.requests[("score", "500")] == 1
    assert totals.requests[("other", "404")] == 1
    assert (totals.errors, totals.count, totals.workers, totals.ready_workers) == (1, 5, 2, 1)
    assert totals.sum_ns == 3 * 150_000 + 400_000 + 2_000_000
    assert (totals.run_count, totals.run_sum_ns) == (2, 1_620_000)
    # Three of five observations lie in (100 us, 250 us]: the median interpolates in there.
    assert latency_quantile(totals.buckets, 0.5) == pytest.approx(0.0001 + 0.00015 * 2.5 / 3)
    assert latency_quantile(totals.buckets, 1.0) == 0.0025
    assert latency_quantile((0,) * len(totals.buckets), 0.5) is None


# --- start-up failure and several workers --------------------------------------------------


def test_init_raising_makes_the_server_exit_nonzero_with_the_traceback(tmp_path: Path) -> None:
    script = """
def init():
    raise RuntimeError("the model file is corrupt")

def run(raw_data):
    return raw_data
"""
    module = make_module(tmp_path / "broken", script, {"m.bin": b"x"})
    for workers in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-m", "edge_agent.scoring", "--module-dir", str(module),
             "--port", str(free_port()), "--workers", workers],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 5, done.stderr
        assert "Traceback (most recent call last)" in done.stderr
        assert 'raise RuntimeError("the model file is corrupt")' in done.stderr
        assert done.stderr.rstrip().splitlines()[-1].startswith("edgepack scoring: ")


def test_a_directory_that_is_no_module_is_refused(tmp_path: Path) -> None:
    escaping = make_module(tmp_path / "escaping", "def run(raw_data):\n    return 1\n", {})
    signed = {"name": "escaping", "version": "1", "entry_script": "src/../../evil.py"}
    (escaping / "module.json").write_text(json.dumps({"signed": signed}))
    (tmp_path / "evil.py").write_text("def run(raw_data):\n    return 'evil'\n")
    for module, why in [(tmp_path / "empty", "no module.json"), (escaping, "outside src/")]:
        module.mkdir(exist_ok=True)
        # Options may come from the environment, as a container image passes them.
        env = {**os.environ, "EDGEPACK_MODULE_DIR": str(module), "EDGEPACK_PORT": str(free_port())}
        done = subprocess.run(
            [sys.executable, "-m", "edge_agent.scoring"], capture_output=True, text=True, timeout=60, env=env
        )
        assert done.returncode == 5, done.stderr
        assert why in done.stderr
        assert str(module) in done.stderr


def test_two_workers_both_serve_add_up_metrics_and_get_replaced_when_they_crash(tmp_path: Path) -> None:
    module = make_module(tmp_path / "toy2", TOY_SCRIPT, {"m.bin": b"x"})
    with serving(module, workers=2) as server:
        deadline = time.monotonic() + START_TIMEOUT_S
        while httpx.get(server.url + "/metrics").text.count("edgepack_ready_workers 2") == 0:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        pids: set[int] = set()
        requests = 0
        # Each request on a new connection: the kernel spreads connections over the workers.
        while len(pids) < 2 and requests < 200:
            r = httpx.post(server.url + "/score", json={"n": requests})
            assert r.status_code == 200
            pids.add(r.json()["pid"])
            requests += 1
        assert len(pids) == 2, f"only {pids} answered {requests} requests"
        assert server.proc.pid not in pids
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, 'edgepack_requests_total{route="score",status="200"}') == requests
        assert metric(text, "edgepack_workers") == 2

        # A worker that dies while serving is replaced; the server as a whole keeps going.
        with pytest.raises(httpx.TransportError):
            httpx.post(server.url + "/score", json={"crash": True})
        deadline = time.monotonic() + START_TIMEOUT_S
        answering: set[int] = set()
        while not (answering - pids and len(answering) == 2):
            assert time.monotonic() < deadline, f"no replacement worker:\n{server.log()}"
            try:
                r = httpx.post(server.url + "/score", json={"n": 0})
            except httpx.TransportError:
                time.sleep(0.02)  # a connection caught the dying worker's socket
                continue
            if r.status_code == 200:
                answering.add(r.json()["pid"])
        assert "exited with code 3; starting a new one" in server.log()
