"""Benchmark the scoring server against Azure ML's inference server, and build/verify speed.

In one run, on the digits example (trained into a temporary directory):

(a) ``raw``: the entry script's ``run()`` called in-process, the limit for any server;
(b) ``edgepack``: ``python -m edge_agent.scoring`` over HTTP keep-alive on loopback;
(c) ``azureml``: ``azureml-inference-server-http`` from PyPI, installed into a side venv
    cached under ``~/.cache/edgepack-bench/``, serving the same ``score.py`` with the same
    number of worker processes.

(d) ``collect_*``: the digits script with Azure's ``ModelDataCollector`` on its inputs and
    predictions, served with data collection off (``collect()`` does nothing), at 5 % and at
    100 % sampling, in rounds of their own: ``collect_5pct_ratio`` and ``collect_100pct_ratio``
    are their throughput over the same module's without collection.

Load comes from ``wrk`` (C, one thread; ``bench/wrk_post.lua`` posts one digit and prints
wrk's latency percentiles as JSON): one connection for latency, several for throughput, in
rounds that alternate between the two servers (each figure is the median over the rounds).
Then a 200 MB random model is built into a signed bundle (``packager.build.build_module``)
and verified (``manifests.bundle.verify_bundle``).

    python bench/scoring.py [--quick] [--workers N] [--connections C]

Progress goes to stderr; the last line on stdout is one JSON object with the figures.
Exit code 1 when a part could not run (its figures are then null) or wrk is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "digits"
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
AZUREML_PACKAGE = "azureml-inference-server-http"
AZUREML_VERSION = "1.5.1"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepack-bench"
MODEL_MB = 200
START_TIMEOUT_S = 60.0
TARGETS = {
    "p50_ratio_max": 0.35,
    "rps_ratio_min": 4.0,
    "verify_mb_s_min": 500.0,
    "collect_5pct_ratio_min": 0.97,
    "collect_100pct_ratio_min": 0.85,
}

#: The digits script as an Azure user adds data collection to it (its inputs and predictions).
COLLECTING_SCORE_PY = """
import json
import os

import numpy as np
import onnxruntime
from azureml.monitoring import ModelDataCollector

session = None
input_name = None


def init():
    global session, input_name, inputs_dc, prediction_dc
    model_path = os.path.join(os.getenv("AZUREML_MODEL_DIR"), "digits.onnx")
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    inputs_dc = ModelDataCollector("digits", designation="inputs")
    prediction_dc = ModelDataCollector("digits", designation="predictions")


def run(raw_data):
    data = np.array(json.loads(raw_data)["data"], dtype=np.float32).reshape(-1, 64)
    inputs_dc.collect(data)
    labels, probabilities = session.run(None, {input_name: data})
    result = {
        "predictions": labels.tolist(),
        "confidence": probabilities.max(axis=1).round(4).tolist(),
    }
    prediction_dc.collect(result)
    return result
"""
#: Sampling rates of the collection comparison, by server name.
COLLECTING = {"collect_off": None, "collect_5pct": 0.05, "collect_100pct": 1.0}
#: Rounds of the collection comparison at least (its ratios are close to 1: noise matters).
COLLECT_ROUNDS_MIN = 7


class BenchError(Exception):
    """A part of the benchmark could not run; the message says why and what to do."""


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- the module under test -------------------------------------------------------------------


@dataclass
class Workload:
    module_dir: Path
    body_path: Path
    expected: int


def prepare_workload(work: Path) -> Workload:
    """Train the digits model and lay out an unpacked module for it (src/, model/)."""
    trained = work / "trained"
    subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), "--out", str(trained)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    module = work / "module"
    (module / "src").mkdir(parents=True)
    (module / "model").mkdir()
    shutil.copy(EXAMPLE / "score.py", module / "src" / "score.py")
    shutil.copy(trained / "digits.onnx", module / "model" / "digits.onnx")
    signed = {"name": "digits", "version": "1", "entry_script": "src/score.py"}
    (module / "module.json").write_text(json.dumps({"signed": signed, "signatures": []}))
    samples = json.loads((trained / "test_samples.json").read_text())
    body = work / "body.json"
    body.write_text(json.dumps({"data": [samples["data"][0]]}))
    return Workload(module, body, int(samples["expected"][0]))


RAW_PROBE = """
import json, sys, time
from pathlib import Path
from edge_agent.scoring.entry import EntryScript

entry = EntryScript.load(Path(sys.argv[1]))
entry.init()
run = entry.module.run
body = Path(sys.argv[2]).read_text()
for _ in range(500):
    run(body)
times = []
deadline = time.perf_counter() + float(sys.argv[3])
while time.perf_counter() < deadline:
    t = time.perf_counter_ns()
    run(body)
    times.append(time.perf_counter_ns() - t)
times.sort()
print(json.dumps({"n": len(times), "p50_us": times[len(times) // 2] / 1e3,
                  "p99_us": times[int(len(times) * 0.99)] / 1e3}))
"""


def measure_raw(workload: Workload, seconds: float) -> dict[str, float]:
    # A separate process: loading an entry script changes the working directory and sys.path.
    done = subprocess.run(
        [sys.executable, "-c", RAW_PROBE, str(workload.module_dir), str(workload.body_path),
         str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        cwd=REPO,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"in-process run() failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def running(
    name: str, cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path, port: int
) -> Iterator[Server]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: every worker is stopped with it
        )
    server = Server(name, f"http://127.0.0.1:{port}", proc, log)
    try:
        yield server
    finally:
        stop(server)


def stop(server: Server) -> None:
    if server.proc.poll() is not None:
        return
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=15)
    except ProcessLookupError:
        pass


def wait_until_scoring(server: Server, workload: Workload) -> None:
    """Until ``/score`` answers with the right prediction (the server has run init())."""
    body = workload.body_path.read_bytes()
    deadline = time.monotonic() + START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with code {server.proc.returncode}; "
                f"its log ({server.log}):\n{server.log.read_text(errors='replace')[-3000:]}"
            )
        try:
            r = httpx.post(
                server.url + "/score",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=5,
            )
            if r.status_code == 200:
                predictions = r.json()["predictions"]
                if predictions != [workload.expected]:
                    raise BenchError(f"{server.name} predicted {predictions}, expected [{workload.expected}]")
                return
            last = f"HTTP {r.status_code}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise BenchError(f"{server.name} did not score within {START_TIMEOUT_S}s (last: {last})")


def wrk(url: str, body: Path, *, connections: int, seconds: float) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
           "-s", str(WRK_SCRIPT), url + "/score"]  # fmt: skip
    env = {**os.environ, "EDGEPACK_BENCH_BODY": str(body)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 30)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    bad = sum(v for k, v in result.items() if k.startswith("errors_"))
    if bad:
        raise BenchError(f"wrk saw {bad} failed requests against {url}: {result}")
    return result


@dataclass
class LoadPlan:
    warmup_s: float
    latency_s: float
    throughput_s: float
    connections: int
    rounds: int


def compare(servers: list[Server], workload: Workload, plan: LoadPlan) -> dict[str, dict[str, float]]:
    """Latency and throughput of each server, measured in alternating rounds.

    Alternating (A, B, A, B...) rather than all of A then all of B means that when other work
    on the machine slows it down for a while, both servers are slowed alike; each figure is
    the median over the rounds.
    """
    for server in servers:
        wait_until_scoring(server, workload)
        wrk(server.url, workload.body_path, connections=plan.connections, seconds=plan.warmup_s)
    rounds: dict[str, list[dict[str, float]]] = {server.name: [] for server in servers}
    for _ in range(plan.rounds):
        for server in servers:
            latency = wrk(server.url, workload.body_path, connections=1, seconds=plan.latency_s)
            loaded = wrk(
                server.url, workload.body_path, connections=plan.connections, seconds=plan.throughput_s
            )
            rounds[server.name].append(
                {
                    "p50_us": latency["p50_us"],
                    "p99_us": latency["p99_us"],
                    "rps": loaded["rps"],
                    "loaded_p50_us": loaded["p50_us"],
                }
            )
    figures = {
        name: {key: round(statistics.median(r[key] for r in runs), 1) for key in runs[0]}
        for name, runs in rounds.items()
    }
    for name, values in figures.items():
        say(f"{name}: {values} (median of {plan.rounds} rounds)")
    return figures


def edgepack_server(
    workload: Workload, workers: int, log: Path, *, name: str = "edgepack", env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    cmd = [sys.executable, "-m", "edge_agent.scoring", "--module-dir", str(workload.module_dir),
           "--port", str(port), "--workers", str(workers)]  # fmt: skip
    return running(name, cmd, cwd=REPO, env={**os.environ, **(env or {})}, log=log, port=port)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of every process in the process group ``pgid`` (a server
    and its workers: each runs in a session of its own)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def collecting_workload(work: Path, workload: Workload) -> Workload:
    """The same module with the collecting script."""
    module = work / "module-collecting"
    shutil.copytree(workload.module_dir, module)
    (module / "src" / "score.py").write_text(COLLECTING_SCORE_PY)
    return Workload(module, workload.body_path, workload.expected)


def measure_collection(work: Path, workload: Workload, workers: int, plan: LoadPlan) -> dict[str, Any]:
    """Throughput of the collecting module without collection, at 5 % and at 100 %.

    Each ratio is the median over rounds of that round's ratio (paired: the servers of one
    round share whatever else the machine was doing then), the order rotating every round so
    that no server always goes first."""
    collecting = collecting_workload(work, workload)
    rounds = max(plan.rounds, COLLECT_ROUNDS_MIN)
    per_round: dict[str, list[float]] = {name: [] for name in COLLECTING}
    cpu_s: dict[str, float] = dict.fromkeys(COLLECTING, 0.0)
    requests: dict[str, int] = dict.fromkeys(COLLECTING, 0)
    with contextlib.ExitStack() as stack:
        servers = []
        for name, rate in COLLECTING.items():
            env = {} if rate is None else {
                "EDGEPACK_DATA_DIR": str(work / "spool" / name),
                "EDGEPACK_DATA_SAMPLE_RATE": str(rate),
                "EDGEPACK_SERVICE": "digits",
            }  # fmt: skip
            log = work / f"{name}.log"
            servers.append(stack.enter_context(edgepack_server(collecting, workers, log, name=name, env=env)))
        for server in servers:
            wait_until_scoring(server, collecting)
            wrk(server.url, collecting.body_path, connections=plan.connections, seconds=plan.warmup_s)
        for index in range(rounds):
            order = servers[index % len(servers) :] + servers[: index % len(servers)]
            for server in order:
                cpu_before = group_cpu_s(server.proc.pid)
                loaded = wrk(
                    server.url, collecting.body_path, connections=plan.connections, seconds=plan.throughput_s
                )
                per_round[server.name].append(loaded["rps"])
                cpu_s[server.name] += group_cpu_s(server.proc.pid) - cpu_before
                requests[server.name] += loaded["requests"]
    spooled = sum(f.stat().st_size for f in (work / "spool").rglob("*.jsonl.gz"))
    base = per_round["collect_off"]
    ratios = {
        name: round(statistics.median(r / b for r, b in zip(runs, base, strict=True)), 3)
        for name, runs in per_round.items()
    }
    figures = {f"{name}_rps": round(statistics.median(runs), 1) for name, runs in per_round.items()}
    # The server's CPU time per request over all its rounds (clock ticks are 10 ms: one round's
    # figure would be too coarse): what the rps ratio would be on a machine nobody else uses,
    # and it moves far less with other tenants' load than throughput does.
    cpu_us = {name: cpu_s[name] / requests[name] * 1e6 for name in COLLECTING}
    figures.update({f"{name}_cpu_us_per_request": round(us, 1) for name, us in cpu_us.items()})
    say(f"collection: {figures}, ratios {ratios} over {rounds} rounds; {spooled} bytes spooled (gzip)")
    return {
        **figures,
        "collect_5pct_cpu_ratio": round(cpu_us["collect_off"] / cpu_us["collect_5pct"], 3),
        "collect_100pct_cpu_ratio": round(cpu_us["collect_off"] / cpu_us["collect_100pct"], 3),
        "collect_5pct_ratio": ratios["collect_5pct"],
        "collect_100pct_ratio": ratios["collect_100pct"],
        "collect_spooled_bytes": spooled,
    }


# --- the Azure ML inference server in its side venv ---------------------------------------


def azureml_venv() -> Path:
    """The cached side venv with the Azure server and the same onnxruntime/numpy as ours."""
    pins = {
        AZUREML_PACKAGE: AZUREML_VERSION,
        "onnxruntime": importlib.metadata.version("onnxruntime"),
        "numpy": importlib.metadata.version("numpy"),
    }
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = "-".join(f"{name}{version}" for name, version in pins.items())
    venv = CACHE / f"{key}-{py}"
    if (venv / ".complete").exists():
        return venv
    say(f"installing {AZUREML_PACKAGE}=={AZUREML_VERSION} into {venv} (once; cached)")
    # Built in place (venv scripts name their interpreter by path); the .complete marker,
    # written last, is what makes it count, so a half-done install is simply redone.
    shutil.rmtree(venv, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    # The base interpreter, not ours: the side venv must not see edgepack's packages.
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True, timeout=300)
    requirements = [f"{name}=={version}" for name, version in pins.items()]
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", *requirements],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise BenchError(f"pip could not install {requirements}:\n{done.stderr[-3000:]}")
    (venv / ".complete").write_text(json.dumps(pins))
    return venv


def azureml_server(
    venv: Path, workload: Workload, workers: int, log: Path
) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    src = workload.module_dir / "src"
    model = workload.module_dir / "model"
    cmd = [str(venv / "bin" / "azmlinfsrv"), "--entry_script", str(src / "score.py"),
           "--model_dir", str(model), "--port", str(port), "--worker_count", str(workers)]  # fmt: skip
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "AZUREML_MODEL_DIR": str(model),
    }
    return running("azureml", cmd, cwd=src, env=env, log=log, port=port)


# --- build and verify ------------------------------------------------------------------------


def measure_build_verify(work: Path, workload: Workload, model_mb: int) -> dict[str, float]:
    from manifests.bundle import verify_bundle
    from manifests.signing import TrustStore, generate_private_key
    from packager.build import BuildSpec, build_module

    model = work / "big-model.bin"
    chunk = 16 << 20
    with model.open("wb") as fh:
        for _ in range(model_mb * (1 << 20) // chunk):
            fh.write(os.urandom(chunk))
    size_mb = model.stat().st_size / 1e6
    key = generate_private_key()
    trust = TrustStore().with_key(key.public_key(), name="bench")
    spec = BuildSpec(
        name="big",
        version="1",
        entry_script=workload.module_dir / "src" / "score.py",
        model=model,
    )
    # Best of a few runs: the throughput the code reaches when no other tenant of the VM
    # takes the CPU away (the latency runs above report percentiles instead).
    build_times = []
    for _ in range(2):
        t = time.perf_counter()
        result = build_module(spec, key, work / "dist")
        build_times.append(time.perf_counter() - t)
    verify_times = []
    for _ in range(3):
        t = time.perf_counter()
        with result.path.open("rb") as fh:
            verify_bundle(fh, trust)
        verify_times.append(time.perf_counter() - t)
    figures = {
        "build_mb_s": round(size_mb / min(build_times), 1),
        "verify_mb_s": round(size_mb / min(verify_times), 1),
        "model_mb": round(size_mb, 1),
    }
    say(f"build/verify: {figures}")
    return figures


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per server")
    parser.add_argument("--connections", type=int, default=8, help="connections for throughput")
    parser.add_argument("--model-mb", type=int, default=MODEL_MB)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    if shutil.which("wrk") is None:
        print("bench/scoring.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 1
    plan = (
        LoadPlan(warmup_s=1, latency_s=2, throughput_s=2, connections=args.connections, rounds=3)
        if args.quick
        else LoadPlan(warmup_s=3, latency_s=6, throughput_s=6, connections=args.connections, rounds=5)
    )
    out: dict[str, Any] = {
        "workers": args.workers,
        "connections": args.connections,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "azureml_version": AZUREML_VERSION,
    }
    problems: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="edgepack-bench-"))
    try:
        say(f"training the digits model in {work}")
        workload = prepare_workload(work)

        raw = measure_raw(workload, 1.0 if args.quick else 5.0)
        out.update(raw_p50_us=round(raw["p50_us"], 1), raw_p99_us=round(raw["p99_us"], 1))
        say(f"raw run(): {raw}")

        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(edgepack_server(workload, args.workers, work / "edgepack.log"))]
            try:
                venv = azureml_venv()
                servers.append(
                    stack.enter_context(azureml_server(venv, workload, args.workers, work / "azureml.log"))
                )
                wait_until_scoring(servers[-1], workload)
            except BenchError as exc:
                problems.append(f"azureml: {exc}")
                say(problems[-1])
                del servers[1:]
            figures = compare(servers, workload, plan)
        for name, values in figures.items():
            out.update({f"{name}_{key}": value for key, value in values.items()})
        if "azureml" in figures:
            ours, theirs = figures["edgepack"], figures["azureml"]
            out["p50_ratio"] = round(ours["p50_us"] / theirs["p50_us"], 3)
            out["rps_ratio"] = round(ours["rps"] / theirs["rps"], 2)

        out.update(measure_collection(work, workload, args.workers, plan))
        out.update(measure_build_verify(work, workload, args.model_mb))
    except BenchError as exc:
        problems.append(str(exc))
        say(problems[-1])
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    for key in ("raw_p50_us", "edgepack_p50_us", "edgepack_p99_us", "azureml_p50_us",
                "azureml_p99_us", "edgepack_rps", "azureml_rps", "verify_mb_s", "build_mb_s",
                "p50_ratio", "rps_ratio", "collect_5pct_ratio", "collect_100pct_ratio"):  # fmt: skip
        out.setdefault(key, None)
    out["targets"] = TARGETS
    out["targets_met"] = {
        "p50_ratio": out["p50_ratio"] is not None and out["p50_ratio"] <= TARGETS["p50_ratio_max"],
        "rps_ratio": out["rps_ratio"] is not None and out["rps_ratio"] >= TARGETS["rps_ratio_min"],
        "verify_mb_s": out["verify_mb_s"] is not None and out["verify_mb_s"] >= TARGETS["verify_mb_s_min"],
        "collect_5pct_ratio": out["collect_5pct_ratio"] is not None
        and out["collect_5pct_ratio"] >= TARGETS["collect_5pct_ratio_min"],
        "collect_100pct_ratio": out["collect_100pct_ratio"] is not None
        and out["collect_100pct_ratio"] >= TARGETS["collect_100pct_ratio_min"],
    }
    if problems:
        out["problems"] = problems
    print(json.dumps(out), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
