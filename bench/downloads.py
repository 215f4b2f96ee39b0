"""A fleet downloading one module at once through nginx: the hub sends the bytes, or nginx does.

Real engines on loopback (``bench/layout.py``): PostgreSQL, Mosquitto, ``--replicas`` hub
processes sharing one file blob store (``--blob-store file:///…``) and nginx in front. One
module with a ``--model-mb`` random model is pushed, ``--devices`` devices are enrolled in bulk
and given it; then every device fetches the model blob at the same time, each on its own
connection with the agent's own HTTP client (``edge_agent.uplink.http.HubHttp``), and checks
its digest. Twice, on fresh hubs: with ``EDGEPACK_HUB_DOWNLOAD_OFFLOAD=hub`` (the replicas
stream every byte) and ``=nginx`` (they answer ``X-Accel-Redirect``, nginx sends the file).

Per mode: ``mb_s`` (bytes all devices received / wall time), ``hub_cpu_s`` (the replicas'
CPU over the downloads, from ``/proc``), ``nginx_cpu_s`` (nginx's master and workers),
``wall_s``; ``hub_cpu_ms_per_mb`` is what a megabyte sent costs the hub's Python. Before the
measured burst one device fetches the blob once, so the hub's one digest check per file
(security.md §10) is not in it.

Usage: ``python bench/downloads.py [--quick]``; the last line of output is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx

# The benchmarks start the same engines as the tests, with the tests' helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from layout import Layout

from edge_agent.uplink.http import HubHttp
from manifests.device import DeviceCredentials
from manifests.digests import sha256_digest
from tests.factory import Forge
from tests.hub.replica_fixtures import ADMIN

BUNDLE = {"Content-Type": "application/vnd.edgepack.module+tar"}
AUTH = {"Authorization": f"Bearer {ADMIN}"}
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def nginx_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [master, *(int(c) for c in children)]


def fetch(creds: DeviceCredentials, digest: str, size: int, errors: list[str]) -> None:
    """The blob as the agent fetches it, checked against its digest."""
    http = HubHttp(creds, timeout_s=300)
    try:
        hasher, got = hashlib.sha256(), 0
        with http.blob(digest, 0) as (_, chunks):
            for chunk in chunks:
                hasher.update(chunk)
                got += len(chunk)
        if got != size or "sha256:" + hasher.hexdigest() != digest:
            errors.append(f"{creds.device_id}: {got} bytes, digest {hasher.hexdigest()[:12]}")
    except Exception as exc:  # counted and reported; the bench goes on
        errors.append(f"{creds.device_id}: {type(exc).__name__}: {exc}")
    finally:
        http.close()


def measure(
    layout: Layout, *, offload: bool, replicas: int, devices: int, model_mb: int
) -> dict[str, object]:
    mode = "nginx" if offload else "hub"
    db = layout.database()
    blobs = layout.root / f"blobs-{mode}"
    hubs = layout.hubs(
        replicas, db, f"dl{mode}", blob_store=blobs.as_uri(), nginx=True,
        env={"EDGEPACK_HUB_DOWNLOAD_OFFLOAD": mode}, nginx_blob_dir=blobs if offload else None,
    )  # fmt: skip
    assert layout.nginx is not None
    model = os.urandom(model_mb << 20)
    digest = sha256_digest(model)
    forge = Forge(publisher=layout.publisher_key)  # type: ignore[arg-type]
    bundle = forge.bundle(files={"src/score.py": b"def init(): pass\n", "model/w.bin": model},
                          name="big", version="1")  # fmt: skip
    base = f"http://127.0.0.1:{layout.nginx_port}"
    with httpx.Client(base_url=base, headers=AUTH, timeout=600) as http:
        assert http.post("/api/v1/modules", content=bundle, headers=BUNDLE).status_code == 201
        fleet = [{"id": f"dev-{i:05d}", "tags": {"fleet": "bench"}} for i in range(devices)]
        r = http.post("/api/v1/devices/bulk", json={"devices": fleet})
        assert r.status_code == 201, r.text
        creds = [DeviceCredentials.model_validate(c) for c in r.json()["device_credentials"]]
        body = {"module": "big", "version": "1", "settings": {"port": 8890},
                "target": {"selector": "fleet=bench"}}  # fmt: skip
        assert http.put("/api/v1/deployments/big", json=body).status_code == 201
    errors: list[str] = []
    for _ in hubs:  # each replica checks the file's digest once, before the measured burst
        fetch(creds[0], digest, len(model), errors)
    threads = [threading.Thread(target=fetch, args=(c, digest, len(model), errors)) for c in creds]
    hub_pids = [h.process.pid for h in hubs if h.process is not None]
    web_pids = nginx_pids(layout.nginx.pid)
    hub_before, web_before, start = cpu_s(hub_pids), cpu_s(web_pids), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    hub_cpu, web_cpu = cpu_s(hub_pids) - hub_before, cpu_s(web_pids) - web_before
    layout.stop_hubs()
    mb = devices * len(model) / 1e6
    return {
        f"{mode}_mb_s": round(mb / wall, 1),
        f"{mode}_wall_s": round(wall, 2),
        f"{mode}_hub_cpu_s": round(hub_cpu, 2),
        f"{mode}_nginx_cpu_s": round(web_cpu, 2),
        f"{mode}_hub_cpu_ms_per_mb": round(hub_cpu * 1000 / mb, 3),
        f"{mode}_errors": len(errors),
        **({f"{mode}_first_error": errors[0]} if errors else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 devices, 16 MB each (about a minute)")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--model-mb", type=int, default=None)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    devices = args.devices or (20 if args.quick else 100)
    model_mb = args.model_mb or (16 if args.quick else 32)
    layout = Layout.start()
    result: dict[str, object] = {
        "bench": "downloads", "devices": devices, "model_mb": model_mb, "replicas": args.replicas,
        "load_average_1m": round(os.getloadavg()[0], 1),
    }  # fmt: skip
    try:
        for offload in (False, True):
            figures = measure(
                layout, offload=offload, replicas=args.replicas, devices=devices, model_mb=model_mb
            )
            print(json.dumps(figures), file=sys.stderr)
            result.update(figures)
    finally:
        layout.close()
    hub_off, hub_on = result["hub_hub_cpu_s"], result["nginx_hub_cpu_s"]
    assert isinstance(hub_off, float) and isinstance(hub_on, float)
    result["hub_cpu_saved_s"] = round(hub_off - hub_on, 2)
    for key, value in result.items():
        print(f"{key:>26}: {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
