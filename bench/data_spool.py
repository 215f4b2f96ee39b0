"""A device offline for a simulated day: what its data spool keeps, drops and uploads.

Two runs of the real parts (the scoring server's collector and spool writer, the agent's
uploader with its real HTTP client) on one simulated clock, the module collecting its inputs
and predictions for every request at ``--rate`` requests per second for 24 hours while the hub
is out of reach (connection refused):

- ``within``: the quota holds the day: nothing may be lost; then the hub comes back (a small
  HTTP receiver that checks each batch's digest and stores it once) and every record must
  reach it exactly once;
- ``beyond``: the quota holds about a quarter of the day: the oldest records are dropped, the
  newest kept, and the uploader's count of dropped records must equal what is missing.

    python bench/data_spool.py [--quick] [--rate N]

Progress goes to stderr; the last line on stdout is one JSON object with the figures.
Exit code 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_agent.data.spool import list_spool, spool_dir  # noqa: E402
from edge_agent.data.uploader import Uploader, UploaderSettings  # noqa: E402
from edge_agent.scoring.collector import Collection, CollectionSettings  # noqa: E402
from edge_agent.uplink.http import HubHttp  # noqa: E402
from manifests.device import DeviceCredentials  # noqa: E402

SERVICE = "digits"
DAY_S = 24 * 3600
#: How often (simulated seconds) the writer thread and the uploader run.
WRITER_TICK_S = 1
UPLOADER_TICK_S = 60


#: What simulate_day returns for the caller's use, not for the JSON.
HIDDEN = ("kept_ids", "uploader", "http", "clock")


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Receiver:
    """The hub's upload route in miniature: the digest checked, each batch stored once."""

    def __init__(self, port: int) -> None:
        self.batches: dict[str, int] = {}
        self.ids: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                digest = self.path.split("?")[0].rsplit("/", 1)[1]
                status = 422
                if digest == "sha256:" + hashlib.sha256(body).hexdigest():
                    status = 200 if digest in receiver.batches else 201
                    if status == 201:
                        lines = gzip.decompress(body).splitlines()
                        receiver.batches[digest] = len(lines)
                        receiver.ids += [json.loads(line)["data"]["request"] for line in lines]
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def credentials(port: int) -> DeviceCredentials:
    document = json.loads((REPO / "manifests" / "examples" / "device-credentials.json").read_text())
    document.update(hub_url=f"http://127.0.0.1:{port}")
    document.pop("ca_pem", None)
    return DeviceCredentials.model_validate(document)


def simulate_day(state: Path, *, rate: int, quota: int, port: int) -> dict[str, Any]:
    """24 simulated hours offline; returns what was collected, kept and dropped."""
    clock = Clock()
    settings = CollectionSettings(folder=spool_dir(state, SERVICE), service=SERVICE, quota_bytes=quota)
    collection = Collection(settings, module_name=SERVICE, module_version="1", clock=clock)
    http = HubHttp(credentials(port), timeout_s=5)
    uploader = Uploader(
        state, http.put_batch, lambda: {SERVICE: quota}, settings=UploaderSettings(), clock=clock
    )
    rng = random.Random(7)
    request = 0
    started = time.perf_counter()
    for second in range(DAY_S):
        clock.now = float(second)
        for _ in range(rate):
            pixels = [round(rng.random() * 16, 1) for _ in range(64)]
            prediction = {"request": request, "y": rng.randrange(10)}
            for designation, data in (
                ("inputs", {"request": request, "x": pixels}),
                ("predictions", prediction),
            ):
                collection.collect(
                    data,
                    model=SERVICE,
                    model_version="1",
                    designation=designation,
                    correlation_id=f"r{request}",
                )
            request += 1
        if second % WRITER_TICK_S == 0:
            collection.writer.drain()
        if second % UPLOADER_TICK_S == 0:
            uploader.scan()
    clock.now = float(DAY_S)
    collection.writer.drain(final=True)
    uploader.scan()
    elapsed = time.perf_counter() - started
    listing = list_spool(settings.folder)
    kept: dict[str, list[int]] = {"inputs": [], "predictions": []}
    for segment in listing.segments:
        for line in gzip.decompress(segment.path.read_bytes()).splitlines():
            record = json.loads(line)
            kept[record["designation"]].append(record["data"]["request"])
    kept_ids = sorted(kept["inputs"] + kept["predictions"])
    # The newest are kept: of each designation, every request from its oldest kept one on.
    newest_kept = all(sorted(ids) == list(range(min(ids, default=request), request)) for ids in kept.values())
    collected = 2 * request
    dropped = uploader.figures()[SERVICE].dropped_total
    return {
        "requests": request,
        "collected": collected,
        "spooled_records": len(kept_ids),
        "spooled_bytes": listing.bytes,
        "segments": len(listing.segments),
        "dropped_reported": dropped,
        "dropped_by_writer": collection.dropped.total(),
        "lost": collected - len(kept_ids) - dropped,
        "newest_kept": newest_kept,
        "kept_ids": kept_ids,
        "clock": clock,
        "uploader": uploader,
        "http": http,
        "seconds": round(elapsed, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 request/s (about a minute)")
    parser.add_argument("--rate", type=int, default=None, help="requests per simulated second")
    args = parser.parse_args()
    rate = args.rate or (1 if args.quick else 5)
    out: dict[str, Any] = {"rate_per_s": rate, "simulated_hours": 24, "quick": args.quick}
    work = Path(tempfile.mkdtemp(prefix="edgepack-spool-"))
    problems: list[str] = []
    try:
        port = free_port()
        # A day of this traffic compresses to about 130 bytes a request: 4 times that is room.
        within = simulate_day(work / "within", rate=rate, quota=max(1 << 20, rate * DAY_S * 520), port=port)
        say(f"within quota: { ({k: v for k, v in within.items() if k not in HIDDEN}) }")
        receiver = Receiver(port)  # the hub is back
        try:
            deadline = time.monotonic() + 600
            clock_moves = within["clock"]
            while list_spool(spool_dir(work / "within", SERVICE)).segments and time.monotonic() < deadline:
                clock_moves.now += 3600  # past any backoff
                within["uploader"].scan()
        finally:
            within["http"].close()
            receiver.close()
        uploaded = sorted(receiver.ids)
        within_out = {k: v for k, v in within.items() if k not in HIDDEN}
        within_out["uploaded_records"] = len(uploaded)
        within_out["uploaded_each_once"] = uploaded == sorted(within["kept_ids"])
        within_out["batches"] = len(receiver.batches)
        out["within"] = within_out

        quota = max(1 << 20, within["spooled_bytes"] // 4)
        beyond = simulate_day(work / "beyond", rate=rate, quota=quota, port=free_port())
        beyond["http"].close()
        newest_kept = beyond["newest_kept"]
        beyond_out = {k: v for k, v in beyond.items() if k not in HIDDEN}
        beyond_out.update(quota_bytes=quota, newest_kept=newest_kept)
        beyond_out["dropped_expected"] = beyond["collected"] - beyond["spooled_records"]
        out["beyond"] = beyond_out
        say(f"beyond quota: {beyond_out}")

        out["targets_met"] = {
            "within_lost_0": within_out["lost"] == 0 and within_out["dropped_reported"] == 0
            and within_out["dropped_by_writer"] == 0,
            "within_uploaded_each_once": within_out["uploaded_each_once"]
            and within_out["uploaded_records"] == within_out["collected"],
            "beyond_dropped_as_expected": beyond_out["dropped_reported"] == beyond_out["dropped_expected"]
            and beyond_out["lost"] == 0 and beyond_out["dropped_reported"] > 0,
            "beyond_newest_kept": newest_kept,
        }  # fmt: skip
        problems += [f"target missed: {name}" for name, met in out["targets_met"].items() if not met]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if problems:
        out["problems"] = problems
    print(json.dumps(out), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
