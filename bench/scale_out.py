"""The scaled-out hub's fleet operations: pushes to S3 vs the local store, a 1,000-device deploy.

Real engines on loopback (``bench/layout.py``): PostgreSQL, SeaweedFS, Mosquitto, hub processes
and nginx.

- ``push_*_mb_s``: a module with one large random model file pushed over HTTP to one hub
  process whose blobs are on the local disk, then to one whose blobs are in S3 (SeaweedFS);
  the hub verifies every signature and digest while it streams (best of ``--pushes``).
- ``deploy_*``: two hub replicas behind nginx on PostgreSQL; ``--devices`` devices enrolled
  (rows written straight into the database, then issued by a first deploy), then one deploy
  through nginx that changes every device's state: ``deploy_request_s`` is the request, and
  ``deploy_published_s`` the time until the broker holds every device's new retained state
  (counted by a subscriber); ``deploy_unpublished`` must be 0.

Usage: ``python bench/scale_out.py [--quick]``; the last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

# The benchmarks start the same engines as the tests, with the tests' helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from layout import DEVICE_ROW, Layout
from sqlalchemy import create_engine, text

from cloud_hub.broker.passwords import hash_password
from tests.factory import Forge
from tests.hub.replica_fixtures import ADMIN

BUNDLE = {"Content-Type": "application/vnd.edgepack.module+tar"}
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def push_rate(layout: Layout, model_mb: int, pushes: int, *, s3: bool) -> float:
    db = layout.database()
    prefix = f"push{'s3' if s3 else 'file'}"
    blob_store = layout.seaweedfs.url(prefix=prefix) if s3 and layout.seaweedfs else None
    (hub,) = layout.hubs(1, db, prefix, blob_store=blob_store)
    forge = Forge(publisher=layout.publisher_key)  # type: ignore[arg-type]
    best = 0.0
    with httpx.Client(base_url=hub.url, headers={**AUTH, **BUNDLE}, timeout=600) as http:
        for i in range(pushes):
            model = os.urandom(model_mb << 20)
            bundle = forge.bundle(files={"src/score.py": b"def init(): pass\n", "model/w.bin": model},
                                  name="big", version=str(i + 1))  # fmt: skip
            start = time.perf_counter()
            r = http.post("/api/v1/modules", content=bundle)
            took = time.perf_counter() - start
            if r.status_code != 201:
                raise SystemExit(f"push failed: {r.status_code} {r.text[:300]}")
            best = max(best, len(bundle) / (1 << 20) / took)
    layout.stop_hubs()
    return round(best, 1)


def deploy_time(layout: Layout, devices: int) -> dict[str, object]:
    db = layout.database()
    prefix = "fleet"
    hubs = layout.hubs(2, db, prefix, nginx=True, upkeep_s=1.0)
    url = f"http://127.0.0.1:{layout.nginx_port}"
    forge = Forge(publisher=layout.publisher_key)  # type: ignore[arg-type]
    with httpx.Client(base_url=url, headers=AUTH, timeout=600) as http:
        for version in ("1", "2"):
            files = {"src/score.py": f"# v{version}\n".encode(), "model/m.bin": b"weights"}
            bundle = forge.bundle(files=files, name="svc", version=version)
            assert http.post("/api/v1/modules", content=bundle, headers=BUNDLE).status_code == 201
        engine = create_engine(db)
        pw = hash_password("x")
        with engine.begin() as conn:
            rows = [{"id": f"dev-{i:05d}", "tags": '{"site": "x"}', "pw": pw, "tok": f"t-{i}"}
                    for i in range(devices)]  # fmt: skip
            conn.execute(text(DEVICE_ROW), rows)
        body = {"module": "svc", "version": "1", "settings": {"port": 9000}, "target": {"selector": "site=x"}}
        assert http.put("/api/v1/deployments/svc", json=body).status_code == 201  # issues every device

        seen: queue.Queue[tuple[str, int]] = queue.Queue()
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        sub.on_message = lambda _c, _u, m: seen.put(
            (m.topic, json.loads(m.payload)["signed"]["generation"]) if m.payload else ("", 0)
        )
        sub.connect(layout.broker.host, layout.broker.port)
        sub.loop_start()
        sub.subscribe(f"{prefix}/devices/+/desired", qos=1)
        time.sleep(2)  # the retained generation-1 states arrive and are drained below
        while not seen.empty():
            seen.get()

        start = time.perf_counter()
        r = http.put("/api/v1/deployments/svc", json={**body, "version": "2"})
        request_s = time.perf_counter() - start
        assert r.status_code == 200, r.text
        new: set[str] = set()
        deadline = time.monotonic() + 300
        while len(new) < devices and time.monotonic() < deadline:
            try:
                topic, generation = seen.get(timeout=1)
            except queue.Empty:
                continue
            if generation >= 2:
                new.add(topic)
        published_s = time.perf_counter() - start
        sub.loop_stop()
        sub.disconnect()
        with engine.connect() as conn:
            unpublished = conn.execute(
                text("SELECT count(*) FROM device_desired WHERE published_generation <> generation"
                     " OR published_generation IS NULL")
            ).scalar_one()
        engine.dispose()
    layout.stop_hubs()
    del hubs
    return {
        "deploy_devices": devices,
        "deploy_request_s": round(request_s, 3),
        "deploy_published_s": round(published_s, 3),
        "deploy_devices_published": len(new),
        "deploy_unpublished": unpublished,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--pushes", type=int, default=None)
    args = parser.parse_args()
    model_mb = 64 if args.quick else 200
    pushes = args.pushes or (2 if args.quick else 3)
    layout = Layout.start(s3=True)
    try:
        result: dict[str, object] = {"bench": "fleet", "push_model_mb": model_mb}
        result["push_file_mb_s"] = push_rate(layout, model_mb, pushes, s3=False)
        print(f"push to the local store: {result['push_file_mb_s']} MB/s", file=sys.stderr)
        result["push_s3_mb_s"] = push_rate(layout, model_mb, pushes, s3=True)
        print(f"push to S3: {result['push_s3_mb_s']} MB/s", file=sys.stderr)
        result.update(deploy_time(layout, args.devices))
    finally:
        layout.close()
    for key, value in result.items():
        print(f"{key:>26}: {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
