"""Batches of collected data as an agent sends them (manifests.data), for the hub's tests."""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
from datetime import UTC, date, datetime
from typing import Any

import httpx

from manifests.data import CONTENT_TYPE, RECORDS_HEADER, UPLOAD_PATH, BatchKey
from tests.conftest import Publisher
from tests.hub.conftest import RunningHub
from tests.hub.fleet_support import Enrolled, deploy, enroll, push

DAY = date(2026, 12, 7)


def key_of(service: str, *, designation: str = "inputs", day: date = DAY, model: str = "digits") -> BatchKey:
    return BatchKey(service=service, model=model, model_version="3", designation=designation, day=day)


def record(key: BatchKey, n: int, **overrides: Any) -> dict[str, Any]:
    at = datetime(key.day.year, key.day.month, key.day.day, 10, 0, n % 60, tzinfo=UTC)
    body: dict[str, Any] = {
        "time": at.isoformat(),
        "service": key.service,
        "model": key.model,
        "model_version": key.model_version,
        "designation": key.designation,
        "correlation_id": f"req-{n}",
        "data": {"x": [n, n + 1]},
    }
    return {**body, **overrides}


def lines(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def upload(
    hub: RunningHub,
    token: str,
    key: BatchKey,
    body: bytes,
    *,
    records: int,
    digest: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    sent = {
        "Content-Encoding": "gzip",
        "Content-Type": CONTENT_TYPE,
        RECORDS_HEADER: str(records),
        **(headers or {}),
    }
    with hub.client(token=token) as http:
        return http.put(
            f"{UPLOAD_PATH}/{digest or digest_of(body)}?{key.query()}", content=body, headers=sent
        )


def batch_of(key: BatchKey, count: int) -> tuple[bytes, list[dict[str, Any]]]:
    records = [record(key, n) for n in range(count)]
    return gz(lines(records)), records


def device_running(hub: RunningHub, publisher: Publisher, device_id: str, service: str) -> Enrolled:
    """An enrolled device whose desired state runs ``service``."""
    module = push(hub, publisher, f"{service}-mod", "1")
    with hub.client() as http:
        device = enroll(http, device_id)
        r = deploy(http, service, module, devices=[device_id])
        assert r.status_code in (200, 201), r.text
    return device


def head_only(hub: RunningHub, path: str, headers: dict[str, str], timeout_s: float = 10) -> bytes:
    """Send a PUT's head (its Content-Length announcing a body) and no body; what the hub answers."""
    host, port = hub.url.removeprefix("http://").split(":")
    head = f"PUT {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(head.encode() + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer
