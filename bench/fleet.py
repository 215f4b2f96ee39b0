"""A fleet of thousands on one machine: enrolment, deploy and update to Healthy, ingest, hub memory.

For each fleet size N (``--devices 100,1000,5000``), on fresh engines:

- Mosquitto with the password file and ACL the hub generates, and ``edgepack hub serve`` on
  SQLite as a process of its own (so its CPU time and peak RSS are its own);
- **enrolment**: ``edgepack device enroll --from-file devices.csv --out-dir creds/`` (one
  request, one broker reload), timed as the command runs: ``enroll_per_s``;
- N simulated devices (``bench/fleet_sim.py``) in ``--shards`` processes: real MQTT clients with
  their own credentials that verify the hub's signature on their desired state
  (``verify_desired``), fetch the manifest and blobs over HTTP with the digest and publisher
  checks, and report Transitioning then Healthy without running a model;
- ``deploy_to_healthy_s``: from ``edgepack deploy`` returning to all N devices Healthy in the
  hub's roll-up (``GET /api/v1/deployments/sim``, what ``edgepack service wait`` reads);
  ``update_to_healthy_s`` the same for a version that changes only score.py;
- ``ingest_msgs_per_s``: every device sends one full reported state at once, three times;
  messages applied per second until the database holds them all (best burst);
- ``hub_peak_rss_mb`` (VmHWM) and the hub's CPU seconds per phase; ``hub_cpu_ms_per_device``:
  the deploy's hub CPU (publishing, the devices' downloads, ingest, roll-up) per device;
- ``hub_cpu_ms_per_download``: devices fetch a module's manifest and blobs with nothing else
  going on; the hub's CPU time over the requests (median of three rounds, each its own devices);
- where the time goes: the hub's own account of a deploy request (sign + store, publish; from
  its log), when the first and last device had its state, the devices' verify and download
  time, when the last one reported Healthy, and the rest (ingest + roll-up) until the roll-up
  said so.

- **joins** (``--join N``, default 5,000; 0 skips): N devices join a fresh hub with one
  provisioning token (``POST /api/v1/join``, as ``edgepack agent join`` sends it). Each device's
  key and signed request are made in the simulator processes before the clock starts (a
  device's own cost); ``join_5000_s`` is the wall time from the first request sent to the last
  answer received, the hub's side: verifying, enrolling in batches, writing the broker's
  accounts. Then a replayed request, one join past the token's uses, a revoked token and a
  forged request must each be refused.
- **rollouts** (on the largest fleet; devices now send telemetry and are told what each
  version does): a version failing 5 % of requests deployed in waves 1/10/50/100 % with gates
  ``error_rate<1%`` and ``p95_ms<1.5x``: ``rollout_bad_max_fraction`` (share of the fleet that
  ever ran it) and ``rollout_rollback_after_halt_s`` (from the halt event to every device
  serving the last good version again); a version twice as slow at p95:
  ``rollout_slow_halted``; a good version through every wave: ``rollout_good_overhead_s``
  (total time minus the bakes). Bakes of ``--bake`` seconds (60) with telemetry every 10 s;
  ``--quick`` bakes 6 s with telemetry every 3 s.

With ``--postgres`` one more point runs the hub on a throwaway PostgreSQL (``postgres_*``).

Usage: ``python bench/fleet.py [--quick] [--devices 100,1000,5000]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_sim import run_shard
from join_sim import run_join_shard

from cloud_hub.broker.mosquitto import prepare_broker_dir, render_config
from cloud_hub.settings import HubSettings
from manifests.signing import generate_private_key, public_key_pem
from tests.conftest import free_port
from tests.factory import Forge
from tests.hub.broker_fixtures import Broker, start_mosquitto

ADMIN = "ep_admin_fleet-bench-token-0123456789"
HUB_MQTT_PASSWORD = "fleet-bench-hub-password"
SERVICE = "sim"
SELECTOR = "fleet=sim"
TARGETS = {
    "enroll_per_s": ">= 3000 (bulk) at 10,000",
    "deploy_to_healthy_s": "<= 15 at 5,000; <= 30 at 10,000",
    "update_to_healthy_s": "< 10 at 1,000",
    "ingest_msgs_per_s": ">= 15000 SQLite; >= 8000 PostgreSQL (at 10,000)",
    "hub_peak_rss_mb": "< 400 at 10,000",
    "cost_vs_n": "no worse than linear",
    "hub_cpu_ms_per_device": "<= 1.5 (deploy: download + publish + ingest)",
    "hub_cpu_ms_per_download": "<= 0.3",
    "join_5000_s": "<= 20 (5,000 joins with one token, each with its own device-made key)",
    "rollout_bad_max_fraction": "<= 0.01 (5 % errors, waves 1/10/50/100 %)",
    "rollout_rollback_after_halt_s": "<= 60",
    "rollout_slow_halted": "true (2x p95, gate p95_ms<1.5x)",
    "rollout_good_overhead_s": "<= 30 (total minus the bakes)",
}
console = Console(stderr=True)


def log(message: str) -> None:
    console.print(message, highlight=False)


def raise_fd_limit() -> None:
    """Mosquitto (started from here) and the simulators hold a socket per device."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Hub:
    url: str
    process: subprocess.Popen[bytes]
    broker: Broker
    root: Path
    db: str

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=600)

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_exact_s(self) -> float:
        """The hub's CPU time in nanoseconds' resolution (the scheduler's account of each live
        thread): ``cpu_s`` moves in clock ticks of 10 ms, too coarse for a few hundred requests.
        A thread that ended in between is not counted; the hub's serving threads do not end."""
        total = 0
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            with suppress(FileNotFoundError, ProcessLookupError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cli(self, *args: str) -> tuple[str, float]:
        """Run ``edgepack ARGS`` as a user would; its output and how long it took."""
        env = {**os.environ, "EDGEPACK_HOME": str(self.root / "home"), "NO_COLOR": "1"}
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "packager", *args, "--hub", self.url, "--token", ADMIN],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        took = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"edgepack {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout, took

    def log_text(self) -> str:
        return (self.root / "hub.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.broker.stop()


def start_hub(root: Path, publisher_pub: Path, db: str | None) -> Hub:
    prefix = f"fleet{os.getpid()}"
    broker_dir, data_dir = root / "broker", root / "hub"
    prepare_broker_dir(
        HubSettings(data_dir=root / "prep", broker_dir=broker_dir, topic_prefix=prefix,
                    mqtt_password=SecretStr(HUB_MQTT_PASSWORD))
    )  # fmt: skip
    run_as = "root" if os.geteuid() == 0 else None
    broker = start_mosquitto(
        root / "mosquitto", lambda port: render_config(broker_dir, port=port, run_as=run_as)
    )
    port = free_port()
    env = {
        **os.environ,
        "EDGEPACK_HUB_ADMIN_TOKEN": ADMIN,
        "EDGEPACK_HUB_MQTT_PASSWORD": HUB_MQTT_PASSWORD,
        "EDGEPACK_HUB_LOG_LEVEL": "info",
        # The rollout loop looks every second (default 2): the bench measures the product's
        # reaction, and a look costs one snapshot read when nothing is due.
        "EDGEPACK_HUB_ROLLOUT_INTERVAL_S": "1",
        **({"EDGEPACK_HUB_DB": db} if db else {}),
    }
    args = [
        sys.executable, "-m", "packager", "hub", "serve", "--data-dir", str(data_dir), "--port", str(port),
        "--trust", str(publisher_pub), "--mqtt-host", broker.host, "--mqtt-port", str(broker.port),
        "--topic-prefix", prefix, "--broker-dir", str(broker_dir), "--broker-pid-file", str(broker.pid_file),
    ]  # fmt: skip
    with (root / "hub.log").open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    hub = Hub(f"http://127.0.0.1:{port}", process, broker, root, db or f"sqlite:///{data_dir / 'hub.db'}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(hub.url + "/api/v1/hub/key", timeout=2).status_code == 200:
                return hub
        except httpx.HTTPError:
            time.sleep(0.1)
    hub.stop()
    raise SystemExit(f"the hub did not start:\n{hub.log_text()[-3000:]}")


# --- simulator processes ---------------------------------------------------------------------


@dataclass
class Shards:
    processes: list[multiprocessing.process.BaseProcess]
    pipes: list[Connection]

    def ask_with(self, kind: str, arg: Any) -> list[Any]:
        for pipe in self.pipes:
            pipe.send((kind, arg))
        return [pipe.recv() for pipe in self.pipes]

    def ask(self, kind: str) -> list[Any]:
        for pipe in self.pipes:
            pipe.send((kind, None))
        return [pipe.recv() for pipe in self.pipes]

    def stop(self) -> None:
        for pipe in self.pipes:
            with suppress(BrokenPipeError, OSError):
                pipe.send(("stop", None))
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def start_shards(documents: list[dict[str, Any]], count: int, root: Path) -> Shards:
    ctx = multiprocessing.get_context("spawn")
    processes, pipes = [], []
    for i in range(count):
        path = root / f"shard-{i}.json"
        path.write_text(json.dumps(documents[i::count]))
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=run_shard, args=(str(path), str(root / f"cache-{i}"), theirs), daemon=True)
        p.start()
        processes.append(p)
        pipes.append(ours)
    shards = Shards(processes, pipes)
    for pipe in pipes:
        if not pipe.poll(600) or pipe.recv() != "ready":
            raise SystemExit("a simulator process did not start")
    deadline = time.monotonic() + 120
    with progress() as bar:
        task = bar.add_task("devices connected", total=len(documents))
        while (connected := sum(shards.ask("connected"))) < len(documents):
            bar.update(task, completed=connected)
            if time.monotonic() > deadline:
                raise SystemExit(f"only {connected} of {len(documents)} simulated devices connected")
            time.sleep(0.2)
        bar.update(task, completed=connected)
    return shards


def progress() -> Progress:
    return Progress(
        TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )  # fmt: skip


# --- phases ----------------------------------------------------------------------------------


def enroll(hub: Hub, n: int) -> tuple[list[dict[str, Any]], float]:
    ids = [f"sim-{i:05d}" for i in range(n)]
    csv_path, out = hub.root / "devices.csv", hub.root / "credentials"
    csv_path.write_text("id,tags\n" + "".join(f"{i},{SELECTOR};shard={k % 4}\n" for k, i in enumerate(ids)))
    _, took = hub.cli("device", "enroll", "--from-file", str(csv_path), "--out-dir", str(out))
    return [json.loads((out / f"{i}.json").read_text()) for i in ids], took


def healthy_count(http: httpx.Client, digest: str) -> tuple[int, int]:
    body = http.get(f"/api/v1/deployments/{SERVICE}").json()
    if body.get("manifest_digest") != digest:
        return 0, len(body.get("devices", []))
    return sum(1 for d in body["devices"] if d["state"] == "Healthy"), len(body["devices"])


def hub_timings(log_text: str, since: int) -> dict[str, float]:
    """The hub's own account of the last fleet change (see ``cloud_hub.fleet.changes``)."""
    found = re.findall(r"fleet change: (\d+) device\(s\) issued in ([\d.]+)s, applied in ([\d.]+)s",
                       log_text[since:])  # fmt: skip
    if not found:
        return {}
    issued, decide, apply = found[-1]
    return {"hub_issue_s": float(decide), "hub_publish_s": float(apply), "hub_issued": int(issued)}


def rollout(hub: Hub, shards: Shards, n: int, version: str, digest: str, dc: Path) -> dict[str, Any]:
    shards.ask("counters")  # start this phase's counts afresh
    cpu0 = hub.cpu_s()
    log_at = len(hub.log_text())
    _, command_s = hub.cli(
        "deploy", "-n", SERVICE, "-m", f"sim:{version}", "--dc", str(dc), "--selector", SELECTOR
    )
    returned = time.time()
    start = time.perf_counter()
    polls: list[float] = []
    with hub.http() as http, progress() as bar:
        task = bar.add_task(f"Healthy on v{version}", total=n)
        while True:
            t = time.perf_counter()
            healthy, listed = healthy_count(http, digest)
            polls.append(time.perf_counter() - t)
            bar.update(task, completed=healthy)
            if healthy == n and listed == n:
                break
            if time.perf_counter() - start > 600:
                raise SystemExit(
                    f"only {healthy} of {n} devices were Healthy after 600 s: {shards.ask('counters')}"
                )
            time.sleep(0.5)  # 'edgepack service wait' polls every second
    to_healthy = time.perf_counter() - start
    counters = shards.ask("counters")
    desired = [t for c in counters for t in c["desired_at"]]
    healthy_at = [t for c in counters for t in c["healthy_at"]]
    last_healthy = max(healthy_at) - returned if healthy_at else float("nan")
    return {
        "to_healthy_s": round(to_healthy, 2),
        # The command itself: process start, the request, and the hub's signing and publishing,
        # which it does before answering (a deploy that answered early would look fast here).
        "command_s": round(command_s, 2),
        **hub_timings(hub.log_text(), log_at),
        "first_desired_s": round(min(desired) - returned, 2) if desired else None,
        "last_desired_s": round(max(desired) - returned, 2) if desired else None,
        "last_device_healthy_s": round(last_healthy, 2),
        "ingest_rollup_lag_s": round(to_healthy - last_healthy, 2),
        "rollup_request_s": round(sorted(polls)[len(polls) // 2], 3),
        "device_verify_cpu_s": round(sum(c["verify_s"] + c["manifest_verify_s"] for c in counters), 2),
        "device_download_s": round(sum(c["download_s"] for c in counters), 2),
        "device_report_cpu_s": round(sum(c["report_s"] for c in counters), 2),
        "manifests_fetched": sum(c["manifests"] for c in counters),
        "blobs_fetched": sum(c["blobs"] for c in counters),
        "mb_fetched": round(sum(c["bytes"] for c in counters) / 1e6, 1),
        "device_failures": sum(c["failed"] for c in counters),
        "errors": [e for c in counters for e in c["errors"]][:3],
        "hub_cpu_s": round(hub.cpu_s() - cpu0, 2),
    }


def ingest_rate(hub: Hub, shards: Shards, n: int, bursts: int = 3) -> dict[str, Any]:
    """Every device sends one full report at once; applied per second until all are stored."""
    engine = create_engine(hub.db)
    best, rates = 0.0, []
    cpu0 = hub.cpu_s()
    try:
        for _ in range(bursts):
            time.sleep(1.0)
            with engine.connect() as conn:
                t0 = conn.execute(text("SELECT max(received_at) FROM device_reports")).scalar_one()
            start = time.perf_counter()
            shards.ask("report-all")
            deadline = time.monotonic() + 300
            while True:
                with engine.connect() as conn:
                    fresh = conn.execute(
                        text("SELECT count(*) FROM device_reports WHERE received_at > :t0"), {"t0": t0}
                    ).scalar_one()
                if fresh >= n:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"ingest: only {fresh} of {n} reports stored after 300 s")
                time.sleep(0.02)
            rate = n / (time.perf_counter() - start)
            rates.append(round(rate))
            best = max(best, rate)
    finally:
        engine.dispose()
    return {
        "ingest_msgs_per_s": round(best),
        "ingest_bursts": rates,
        "ingest_hub_cpu_s": round(hub.cpu_s() - cpu0, 2),
    }


def download_cost(hub: Hub, documents: list[dict[str, Any]], digest: str, rounds: int = 3) -> dict[str, Any]:
    """Hub CPU per download, alone: right after the update's rollout (the hub's grants as a
    rollout leaves them), devices fetch the manifest and every blob of the module they run
    again, with nothing else going on. Each round takes devices the hub has not served in this
    phase; the figure is the median round's hub CPU time over its requests.

    ``hub_cpu_ms_per_download``: over kept-alive connections, as the simulator's devices share
    them (and as the issue's 3 ms was measured); ``..._new_connection``: each device opens its
    own, as separate machines do (one TCP connection's cost spread over its requests)."""
    with hub.http() as http:
        module = next(m for m in http.get("/api/v1/modules").json()
                      if m["manifest_digest"] == digest)  # fmt: skip
    paths = [f"/api/v1/device/manifests/{digest}"]
    paths += [f"/api/v1/device/blobs/{b}" for b in sorted({f["digest"] for f in module["files"]})]
    per_round = max(1, min(len(documents) // (2 * rounds), 300))
    local = threading.local()

    def kept_alive(creds: dict[str, Any]) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=hub.url, timeout=60)
        for path in paths:
            local.client.get(path, headers={"Authorization": f"Bearer {creds['token']}"}).raise_for_status()
        return len(paths)

    def own_connection(creds: dict[str, Any]) -> int:
        headers = {"Authorization": f"Bearer {creds['token']}"}
        with httpx.Client(base_url=hub.url, headers=headers, timeout=60) as dev:
            for path in paths:
                dev.get(path).raise_for_status()
        return len(paths)

    out: dict[str, Any] = {}
    ways = (("hub_cpu_ms_per_download", kept_alive, 0),
            ("hub_cpu_ms_per_download_new_connection", own_connection, rounds))  # fmt: skip
    for key, fetch, offset in ways:
        costs = []
        for r in range(rounds):
            group = documents[(offset + r) * per_round : (offset + r + 1) * per_round]
            cpu0 = hub.cpu_exact_s()
            with ThreadPoolExecutor(8) as pool:
                requests = sum(pool.map(fetch, group))
            costs.append(round((hub.cpu_exact_s() - cpu0) * 1000 / requests, 3))
        out[key] = sorted(costs)[len(costs) // 2]
        out[f"{key}_rounds"] = costs
    return out


ROLLOUT_WAVES = "1%,10%,50%,100%"
ROLLOUT_GATES = ("error_rate<1%", "p95_ms<1.5x")


def rollout_bundles(forge: Forge) -> dict[str, bytes]:
    """Versions 11 (the good one everybody runs first), 12 (fails 5 % of requests), 13 (twice as
    slow at p95) and 14 (as good as 11): what each does is the simulator's behaviour table."""
    model = os.urandom(16 << 10)
    out = {}
    for version in ("11", "12", "13", "14"):
        score = f"# v{version}\ndef init():\n    pass\n\ndef run(raw):\n    return raw\n".encode()
        out[version] = forge.bundle(files={"src/score.py": score, "model/weights.bin": model},
                                    name="rollsim", version=version, entry_script="src/score.py")  # fmt: skip
    return out


def wait_rollout_end(hub: Hub, service: str, timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the rollout until it is no longer running; it, and each wave's timeline: when it was
    released, when its bake began (its devices all Healthy) and when the next step came."""
    deadline = time.monotonic() + timeout
    bakes: dict[int, str] = {}
    with hub.http() as http:
        while True:
            body: dict[str, Any] = http.get(f"/api/v1/deployments/{service}/rollout").json()
            if body.get("bake_started_at"):
                bakes[body["wave"]] = body["bake_started_at"]
            if body.get("state") != "running":
                break
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the rollout of {service} still ran after {timeout:.0f} s: {body['status']}"
                )
            time.sleep(1.0)  # as 'edgepack service rollout NAME status' in a loop would
    steps = rollout_events(hub, service)
    started = [e["at"] for e in steps if e["kind"] == "rollout.wave-started"][-len(body["waves"]) :]
    ends = [e["at"] for e in steps if e["kind"] != "rollout.wave-started"][-len(started) :]
    stamp = _stamp
    timeline = []
    for wave, (began, ended) in enumerate(zip(started, ends, strict=False), start=1):
        bake = bakes.get(wave)
        timeline.append({
            "wave": wave,
            "to_healthy_s": round(stamp(bake) - stamp(began), 2) if bake else None,
            "bake_and_judge_s": round(stamp(ended) - stamp(bake), 2) if bake else None,
        })  # fmt: skip
    return body, timeline


def rollout_events(hub: Hub, service: str) -> list[dict[str, Any]]:
    """The service's rollout events, oldest first, from the hub's database (the feed's newest
    page is full of the devices' own state changes)."""
    engine = create_engine(hub.db)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT kind, at FROM events WHERE service = :s AND kind LIKE 'rollout.%' ORDER BY id"),
                {"s": service},
            ).all()
    finally:
        engine.dispose()
    # SQLite hands back naive UTC text; the hub writes UTC.
    return [
        {"kind": k, "at": (at if isinstance(at, str) else at.isoformat()).replace(" ", "T")} for k, at in rows
    ]


def halted_at(hub: Hub, service: str) -> float:
    """When the hub recorded the halt (the event's time, on this machine's clock)."""
    at = [e["at"] for e in rollout_events(hub, service) if e["kind"] == "rollout.halted"][-1]
    return _stamp(at)


def _stamp(at: str) -> float:
    moment = datetime.fromisoformat(at)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def wait_serving(shards: Shards, digest: str, n: int, timeout: float) -> float:
    """Until every simulated device serves ``digest``; when."""
    deadline = time.monotonic() + timeout
    while (serving := sum(shards.ask_with("serving", digest))) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {serving} of {n} devices serve {digest} after {timeout:.0f} s")
        time.sleep(0.2)
    return time.time()


def rollout_phase(
    hub: Hub, shards: Shards, forge: Forge, n: int, bake_s: float, telemetry_s: float
) -> dict[str, Any]:
    """Three staged deploys on the simulated fleet, each from version 11 (every device on it):
    a version failing 5 % of requests, one twice as slow at p95, and a good one."""
    service, selector = "rollsim", SELECTOR
    digests = {}
    with hub.http() as http:
        for version, bundle in rollout_bundles(forge).items():
            r = http.post("/api/v1/modules", content=bundle,
                          headers={"Content-Type": "application/vnd.edgepack.module+tar"})  # fmt: skip
            if r.status_code != 201:
                raise SystemExit(f"push failed: {r.status_code} {r.text[:300]}")
            digests[version] = r.json()["manifest_digest"]
    hub.cli("service", "delete", SERVICE, "--yes")  # a simulated device runs one service
    shards.ask_with("behave", {digests["12"]: (0.05, 10.0), digests["13"]: (0.0, 20.0)})
    shards.ask_with("telemetry", telemetry_s)
    dc = hub.root / "rollout-dc.json"
    dc.write_text(json.dumps({"computeType": "local", "port": 9100, "edgepack": {"runtime": "process"}}))
    base = ["deploy", "-n", service, "--dc", str(dc), "--selector", selector]
    hub.cli(*base, "-m", "rollsim:11")
    wait_serving(shards, digests["11"], n, 600)
    staged = ["--waves", ROLLOUT_WAVES, "--bake", f"{bake_s:g}s"] + [
        a for g in ROLLOUT_GATES for a in ("--gate", g)
    ]
    out: dict[str, Any] = {"rollout_devices": n, "rollout_bake_s": bake_s, "rollout_telemetry_s": telemetry_s}

    log(f"  rollout of a version failing 5 % of requests ({ROLLOUT_WAVES}, bake {bake_s:g} s)")
    hub.cli(*base, "-m", "rollsim:12", *staged)
    bad, bad_waves = wait_rollout_end(hub, service, 20 * bake_s + 600)
    back_at = wait_serving(shards, digests["11"], n, 600)
    halted = halted_at(hub, service)
    ever = sum(shards.ask_with("ever", digests["12"]))
    out["rollout_bad_status"] = bad["status"]
    out["rollout_bad_waves"] = bad_waves
    out["rollout_bad_max_fraction"] = round(ever / n, 4)
    out["rollout_rollback_after_halt_s"] = round(back_at - halted, 2)
    log(f"    {bad['status']}; {ever} of {n} devices ever ran it; all back on 11 "
        f"{out['rollout_rollback_after_halt_s']} s after the halt")  # fmt: skip

    log("  rollout of a version twice as slow at p95")
    hub.cli(*base, "-m", "rollsim:13", *staged)
    slow, _ = wait_rollout_end(hub, service, 20 * bake_s + 600)
    wait_serving(shards, digests["11"], n, 600)
    out["rollout_slow_status"] = slow["status"]
    out["rollout_slow_halted"] = slow["state"] in ("halted", "rolled-back") and "p95" in slow["status"]
    out["rollout_slow_max_fraction"] = round(sum(shards.ask_with("ever", digests["13"])) / n, 4)
    log(f"    {slow['status']}")

    log("  rollout of a good version through every wave")
    start, started_wall = time.perf_counter(), time.time()
    hub.cli(*base, "-m", "rollsim:14", *staged)
    good, good_waves = wait_rollout_end(hub, service, 20 * bake_s + 600)
    ended = time.perf_counter()
    done = wait_serving(shards, digests["14"], n, 600)
    total = max(ended - start, done - started_wall)
    out["rollout_good_waves"] = good_waves
    waves = len(ROLLOUT_WAVES.split(","))
    out["rollout_good_status"] = good["status"]
    out["rollout_good_total_s"] = round(total, 2)
    out["rollout_good_overhead_s"] = (
        round(total - waves * bake_s, 2) if good["state"] == "completed" else None
    )
    log(f"    {good['status']} in {total:.1f} s ({waves} bakes of {bake_s:g} s)")
    shards.ask_with("telemetry", 0)
    return out


def modules(forge: Forge) -> dict[str, bytes]:
    model = os.urandom(64 << 10)  # one model file both versions share: the update moves score.py only
    out = {}
    for version in ("1", "2"):
        score = f"# v{version}\ndef init():\n    pass\n\ndef run(raw):\n    return raw\n".encode()
        out[version] = forge.bundle(files={"src/score.py": score, "model/weights.bin": model},
                                    name="sim", version=version, entry_script="src/score.py")  # fmt: skip
    return out


def run_point(
    n: int, shard_count: int, db: str | None, rollouts: tuple[float, float] | None = None
) -> dict[str, Any]:
    """One fleet size; with ``rollouts`` (bake, telemetry interval) the rollout phase too."""
    root = Path(tempfile.mkdtemp(prefix=f"edgepack-fleet-{n}-"))
    key = generate_private_key()
    pub = root / "publisher.pub"
    pub.write_bytes(public_key_pem(key.public_key()))
    forge = Forge(publisher=key)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        hub = start_hub(root, pub, db)
        stack.callback(hub.stop)
        digests = {}
        with hub.http() as http:
            for version, bundle in modules(forge).items():
                r = http.post("/api/v1/modules", content=bundle,
                              headers={"Content-Type": "application/vnd.edgepack.module+tar"})  # fmt: skip
                if r.status_code != 201:
                    raise SystemExit(f"push failed: {r.status_code} {r.text[:300]}")
                digests[version] = r.json()["manifest_digest"]
        log(f"[bold]{n} devices[/] ({'PostgreSQL' if db else 'SQLite'}): enrolling from a CSV file")
        cpu0 = hub.cpu_s()
        documents, enroll_s = enroll(hub, n)
        enroll_cpu = hub.cpu_s() - cpu0
        log(f"  enrolled in {enroll_s:.2f} s ({n / enroll_s:.0f}/s); {shard_count} simulator processes start")
        shards = start_shards(documents, shard_count, root)
        stack.callback(shards.stop)
        dc = root / "deploymentconfig.json"
        dc.write_text(json.dumps({"computeType": "local", "port": 9000, "edgepack": {"runtime": "process"}}))
        deploy = rollout(hub, shards, n, "1", digests["1"], dc)
        log(f"  deploy: {deploy['to_healthy_s']} s to Healthy (command {deploy['command_s']} s)")
        update = rollout(hub, shards, n, "2", digests["2"], dc)
        log(f"  update: {update['to_healthy_s']} s to Healthy (command {update['command_s']} s)")
        downloads = download_cost(hub, documents, digests["2"])
        fresh = downloads["hub_cpu_ms_per_download_new_connection"]
        log(f"  downloads: {downloads['hub_cpu_ms_per_download']} ms of hub CPU each (target <= 0.3; "
            f"{fresh} ms with a connection per device)")  # fmt: skip
        ingest = ingest_rate(hub, shards, n)
        log(f"  ingest: {ingest['ingest_msgs_per_s']} msgs/s (bursts {ingest['ingest_bursts']})")
        staged = rollout_phase(hub, shards, forge, n, *rollouts) if rollouts is not None else {}
        return {
            **staged,
            "devices": n,
            "database": "postgresql" if db else "sqlite",
            "enroll_per_s": round(n / enroll_s),
            "enroll_s": round(enroll_s, 2),
            "enroll_hub_cpu_s": round(enroll_cpu, 2),
            "deploy_to_healthy_s": deploy["to_healthy_s"],
            "update_to_healthy_s": update["to_healthy_s"],
            "deploy_command_s": deploy["command_s"],
            # The deploy's hub CPU (publish, downloads, ingest, roll-up) per device.
            "hub_cpu_ms_per_device": round(deploy["hub_cpu_s"] * 1000 / n, 3),
            "update_command_s": update["command_s"],
            **ingest,
            "hub_peak_rss_mb": round(hub.peak_rss_mb(), 1),
            **downloads,
            "deploy": deploy,
            "update": update,
        }


def join_point(n: int, shard_count: int, threads: int = 256) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"edgepack-join-{n}-"))
    pub = root / "publisher.pub"
    pub.write_bytes(public_key_pem(generate_private_key().public_key()))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        hub = start_hub(root, pub, None)
        stack.callback(hub.stop)
        with hub.http() as http:
            asked = {"tags": {"fleet": "joined"}, "uses": n, "expires_in_s": 3600}
            made = http.post("/api/v1/provisioning-tokens", json=asked).json()
            keyid = http.get("/api/v1/hub/key").json()["keyid"]
        ids = [f"join-{i:05d}" for i in range(n)]
        ctx = multiprocessing.get_context("spawn")
        pipes, processes = [], []
        for k in range(shard_count):
            ours, theirs = ctx.Pipe()
            shard = (hub.url, made["token"], keyid, ids[k::shard_count], threads, theirs)
            p = ctx.Process(target=run_join_shard, args=shard, daemon=True)
            p.start()
            pipes.append(ours)
            processes.append(p)
        keygen = [pipe.recv()[1] for pipe in pipes]
        log(f"[bold]{n} joins[/]: keys and requests made on the devices' side ({max(keygen):.1f} s); sending")
        cpu0 = hub.cpu_s()
        for pipe in pipes:
            pipe.send("go")
        answers = [pipe.recv() for pipe in pipes]
        for p in processes:
            p.join(timeout=30)
        took = max(a[1] for a in answers)
        cpu = hub.cpu_s() - cpu0
        statuses = [s for a in answers for s in a[0]]
        with hub.http() as http:
            devices = len(http.get("/api/v1/devices").json()["devices"])
            token_used = http.get("/api/v1/provisioning-tokens").json()["tokens"][0]["used"]
        accounts = sum(1 for line in (root / "broker" / "passwd").read_text().splitlines()
                       if line.startswith("join-"))  # fmt: skip
        refused = join_refusals(hub, answers[0][2], made, keyid)
        # Where the hub spent the time: one "fleet change" log line per batch of joins.
        pattern = r"fleet change: (\d+) device\(s\) issued in ([\d.]+)s, applied in ([\d.]+)s"
        batches = [tuple(map(float, m)) for m in re.findall(pattern, hub.log_text())]
        log(f"  {statuses.count(201)} of {n} joined in {took:.2f} s ({n / took:.0f}/s; hub CPU {cpu:.1f} s); "
            f"{devices} devices, {accounts} broker accounts; refusals {refused}")  # fmt: skip
        return {
            "join_devices": n,
            "join_5000_s" if n == 5000 else f"join_{n}_s": round(took, 2),
            "join_per_s": round(n / took),
            "join_hub_cpu_s": round(cpu, 2),
            "join_ok": statuses.count(201),
            "join_devices_enrolled": devices,
            "join_broker_accounts": accounts,
            "join_token_used": token_used,
            "join_device_keygen_s": round(max(keygen), 2),
            "join_refused": refused,
            "join_throttled_429": sum(a[3] for a in answers),
            "join_batches": len(batches),
            "join_decide_s": round(sum(b[1] for b in batches), 2),
            "join_apply_s": round(sum(b[2] for b in batches), 2),
        }


def join_refusals(hub: Hub, replay: bytes, made: dict[str, Any], keyid: str) -> dict[str, int]:
    """The status of each join that must be refused: a replay, a join past the token's uses,
    a revoked token, a forged request (another device id under the signature)."""
    from manifests.join import make_join_request

    def post(body: bytes, token: str) -> int:
        with httpx.Client(base_url=hub.url, timeout=30) as http:
            r = http.post("/api/v1/join", content=body, headers={"Authorization": f"Bearer {token}"})
            return r.status_code

    def fresh(device_id: str) -> bytes:
        return make_join_request(generate_private_key(), device_id=device_id, hub_keyid=keyid,
                                 nonce=os.urandom(16).hex(), now=datetime.now(UTC))  # fmt: skip

    forged = json.loads(fresh("join-forged"))
    forged["signed"]["device_id"] = "join-other"
    out = {"replayed": post(replay, made["token"]), "exhausted": post(fresh("join-extra"), made["token"]),
           "forged": post(json.dumps(forged).encode(), made["token"])}  # fmt: skip
    with hub.http() as http:
        http.post(f"/api/v1/provisioning-tokens/{made['id']}/revoke")
    out["revoked"] = post(fresh("join-late"), made["token"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 devices (about a minute)")
    parser.add_argument(
        "--devices", default=None, help="fleet sizes, comma-separated (default 100,1000,5000)"
    )
    parser.add_argument("--shards", type=int, default=2, help="simulator processes")
    parser.add_argument("--postgres", action="store_true", help="one more point with the hub on PostgreSQL")
    parser.add_argument("--postgres-devices", type=int, default=1000)
    parser.add_argument("--join", type=int, default=5000, help="devices joining with one token (0: skip)")
    parser.add_argument("--only-join", action="store_true", help="run the join phase alone")
    parser.add_argument("--bake", type=float, default=60.0, help="bake of each rollout wave, seconds")
    args = parser.parse_args()
    raise_fd_limit()
    result: dict[str, Any] = {"bench": "fleet"}
    if args.join:
        result.update(join_point(args.join, args.shards))
    if args.only_join:
        result["targets"] = {k: v for k, v in TARGETS.items() if k.startswith("join")}
        print(json.dumps(result))
        return
    sizes = [int(s) for s in (args.devices or ("100,1000" if args.quick else "100,1000,5000")).split(",")]
    # The rollout phase runs on the largest fleet: 60 s bakes as the targets say, with
    # telemetry every 10 s (the agent's default); --quick bakes 6 s with telemetry every 3 s
    # (about a minute and a half, not five).
    staged = (6.0, 3.0) if args.quick else (args.bake, 10.0)
    curve = [run_point(n, args.shards, None, staged if n == sizes[-1] else None) for n in sizes]
    last = curve[-1]
    for key in ("rollout_bad_max_fraction", "rollout_rollback_after_halt_s", "rollout_slow_halted",
                "rollout_good_overhead_s", "rollout_devices", "rollout_bake_s"):  # fmt: skip
        result[key] = last.get(key)
    for key in ("devices", "enroll_per_s", "deploy_to_healthy_s", "update_to_healthy_s", "hub_peak_rss_mb",
                "ingest_msgs_per_s", "hub_cpu_ms_per_device", "hub_cpu_ms_per_download"):  # fmt: skip
        result[key] = last[key]
    by_n = {p["devices"]: p for p in curve}
    if 1000 in by_n:
        result["deploy_to_healthy_s_1000"] = by_n[1000]["deploy_to_healthy_s"]
        result["update_to_healthy_s_1000"] = by_n[1000]["update_to_healthy_s"]
    if args.postgres:
        from tests.hub.postgres_fixtures import find_postgres_bin, start_postgres

        server = start_postgres(find_postgres_bin())
        try:
            pg = run_point(args.postgres_devices, args.shards, server.url)
        finally:
            server.stop()
        result["postgres"] = {k: v for k, v in pg.items() if k not in ("deploy", "update")}
        result["ingest_msgs_per_s_postgres"] = pg["ingest_msgs_per_s"]
    result["targets"] = TARGETS
    result["curve"] = [{k: v for k, v in p.items() if k not in ("deploy", "update")} for p in curve]
    result["where"] = {str(p["devices"]): {"deploy": p["deploy"], "update": p["update"]} for p in curve}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
