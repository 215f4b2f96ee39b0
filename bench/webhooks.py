"""Events to webhooks, on real parts: a hub process (``edgepack hub serve``) and a receiver
(uvicorn on loopback) that verifies every delivery with ``standardwebhooks``.

- ``burst_delivered_s``: 10,000 events (``device.online`` of 10,000 devices, recorded in one
  transaction through the hub's event log, ``record_event``, on the hub's database, as any
  part of the hub records them) from their commit until the receiver holds all 10,000
  distinct ids (target <= 10 s). The events are written by the bench rather than made by
  10,000 devices so that the number measures delivery, not enrolment.
- ``outage``: the receiver answers 503 for ``outage_s`` (300 s; 10 s with ``--quick``) while
  N devices are enrolled and then revoked (2N events, two per subject), and the hub is
  restarted in the middle of it. Afterwards the receiver must get every event
  (``missing`` 0), enrolled before revoked for each device (``out_of_order`` 0), and none twice
  (``duplicates`` 0: deliveries minus distinct ids); ``recovered_s`` is from the receiver's
  return until the last event arrived.

Usage: ``python bench/webhooks.py [--quick]``; progress on stderr, the last line of stdout is
one JSON object with ``targets`` and ``targets_met``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from standardwebhooks import Webhook

REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "ep_admin_bench-webhooks-token"
#: Retries capped at 10 s so that recovery after the outage is measured, not a long backoff.
HUB_ENV = {
    "EDGEPACK_HUB_ADMIN_TOKEN": ADMIN_TOKEN,
    "EDGEPACK_HUB_WEBHOOK_RETRY_MAX_S": "10",
    "EDGEPACK_HUB_WEBHOOK_POLL_S": "0.2",
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A raw ASGI receiver: 503 while ``down``, else verify, record, 204."""

    def __init__(self) -> None:
        self.down = False
        self.secret: str | None = None
        self.lock = threading.Lock()
        self.deliveries: list[tuple[str, str, str]] = []  # (id, subject, type)
        self.port = free_port()
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, lifespan="off", interface="asgi3",
                                log_level="warning", access_log=False, backlog=4096)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        status = 503
        if not self.down and self.secret is not None:
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            Webhook(self.secret).verify(body, headers)
            event = json.loads(body)
            with self.lock:
                self.deliveries.append((event["id"], event["subject"], event["type"]))
            status = 204
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def distinct(self) -> int:
        with self.lock:
            return len({d[0] for d in self.deliveries})

    def wait_for(self, count: int, timeout: float) -> float:
        started = time.monotonic()
        while self.distinct() < count:
            if time.monotonic() - started > timeout:
                raise SystemExit(f"only {self.distinct()} of {count} events arrived in {timeout:g} s")
            time.sleep(0.01)
        return time.monotonic() - started


class Hub:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # This tree first, then whatever the caller's path had.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, **HUB_ENV, "PYTHONPATH": path}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "packager", "hub", "serve", "--data-dir", str(self.data_dir),
             "--port", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/api/v1/hub/key", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise SystemExit("the hub did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.proc = None

    def client(self) -> httpx.Client:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.Client(base_url=self.url, headers=auth, timeout=600)


def record_events(hub: Hub, count: int) -> None:
    """``count`` device.online events, committed at once through the hub's event log."""
    sys.path.insert(0, str(REPO))
    from cloud_hub.db.base import Sessions, import_tables, make_engine
    from cloud_hub.events import record_event

    import_tables()  # the outbox's listener comes with the tables
    sessions = Sessions(make_engine(f"sqlite:///{hub.data_dir / 'hub.db'}"))
    try:
        with sessions.begin() as s:
            for i in range(count):
                record_event(s, "online", f"burst-{i} came online", device_id=f"burst-{i}")
    finally:
        sessions.engine.dispose()


def enroll(hub: Hub, ids: list[str]) -> None:
    with hub.client() as c:
        r = c.post("/api/v1/devices/bulk", json={"devices": [{"id": i} for i in ids]})
    r.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 10 s outage with 200 devices")
    args = parser.parse_args()
    outage_s, outage_devices, burst = (10.0, 200, 10_000) if args.quick else (300.0, 1000, 10_000)
    result: dict[str, Any] = {"quick": args.quick, "events": burst}
    receiver = Receiver()
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as tmp:
        hub = Hub(Path(tmp) / "hub")
        hub.start()
        try:
            with hub.client() as c:
                r = c.post("/api/v1/webhooks", json={"url": receiver.url})
                r.raise_for_status()
                receiver.secret = r.json()["secret"]

            say(f"burst: {burst} events")
            record_events(hub, burst)
            result["burst_delivered_s"] = round(receiver.wait_for(burst, timeout=600), 2)
            say(f"burst: {result['burst_delivered_s']} s")

            say(f"outage: receiver down for {outage_s:g} s, {outage_devices} devices enrolled and revoked")
            before = len(receiver.deliveries)
            receiver.down = True
            outage_started = time.monotonic()
            ids = [f"out-{i}" for i in range(outage_devices)]
            enroll(hub, ids)
            with hub.client() as c:
                for device_id in ids:
                    c.post(f"/api/v1/devices/{device_id}/revoke").raise_for_status()
            time.sleep(max(0.0, outage_s / 2 - (time.monotonic() - outage_started)))
            say("outage: restarting the hub")
            hub.stop()
            hub.start()
            time.sleep(max(0.0, outage_s - (time.monotonic() - outage_started)))
            receiver.down = False
            result["recovered_s"] = round(receiver.wait_for(burst + 2 * outage_devices, timeout=900), 2)
            # a copy of any event would come within a poll or two
            time.sleep(2)
        finally:
            hub.stop()
    receiver.server.should_exit = True
    after = receiver.deliveries[before:]
    counts = Counter(d[0] for d in after)
    per_subject: dict[str, list[str]] = {}
    seen: set[str] = set()
    for event_id, subject, type_ in after:
        if event_id not in seen:
            seen.add(event_id)
            per_subject.setdefault(subject, []).append(type_)
    expected = ["edgepack.device.enrolled", "edgepack.device.revoked"]
    result["outage_s"] = outage_s
    result["outage_events"] = 2 * outage_devices
    result["missing"] = 2 * outage_devices - len(seen)
    result["duplicates"] = sum(n - 1 for n in counts.values())
    result["out_of_order"] = sum(1 for d in ids if per_subject.get(f"devices/{d}") != expected)
    result["settings"] = {
        k.removeprefix("EDGEPACK_HUB_").lower(): v for k, v in HUB_ENV.items() if "WEBHOOK" in k
    }
    result["targets"] = {"burst_delivered_s": "<= 10", "missing": "0", "out_of_order": "0", "duplicates": "0"}
    result["targets_met"] = (
        result["burst_delivered_s"] <= 10
        and result["missing"] == 0
        and result["out_of_order"] == 0
        and result["duplicates"] == 0
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
