"""Simulated devices that join a hub with one provisioning token (``bench/fleet.py --join``).

One process per shard. Each device makes its own Ed25519 key and its signed join request in
the shard's process, as a real device would on its own CPU, before the clock starts; on
"go" the shard sends its requests over ``threads`` keep-alive connections and returns each
answer's status and the seconds from "go" to its last answer.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from manifests.join import make_join_request
from manifests.signing import generate_private_key


def run_join_shard(
    url: str, token: str, hub_keyid: str, ids: list[str], threads: int, pipe: Connection
) -> None:
    started = time.perf_counter()
    requests = [
        make_join_request(
            generate_private_key(),
            device_id=i,
            hub_keyid=hub_keyid,
            nonce=os.urandom(16).hex(),
            now=datetime.now(UTC),
        )
        for i in ids
    ]
    pipe.send(("ready", time.perf_counter() - started))
    if pipe.recv() != "go":
        return
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    # One client (one keep-alive connection) per thread, used back to back: a connection left
    # idle longer than the hub's keep-alive would be closed under a request.
    local = threading.local()
    clients: list[httpx.Client] = []
    retried: list[int] = []
    go = time.perf_counter()

    def send(n: int) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, headers=headers, timeout=120)
            clients.append(local.client)
        while True:  # as 'edgepack agent join' does: a 429 is sent again after Retry-After
            response = local.client.post("/api/v1/join", content=requests[n])
            if response.status_code != 429:
                return int(response.status_code)
            retried.append(n)
            time.sleep(float(response.headers.get("retry-after", "1")))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        statuses = list(pool.map(send, range(len(requests))))
    took = time.perf_counter() - go
    for client in clients:
        client.close()
    pipe.send((statuses, took, requests[0], len(retried)))
