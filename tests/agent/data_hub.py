"""A hub's data upload endpoint in miniature, for the agent's uploader: real HTTP on loopback,
the contract of ``manifests.data`` checked on every request (token, digest of the bytes, gzip,
record count, every record's key the query's), batches stored once by digest. Tests script
answers (500, 429, 403 ...) and take it offline and back on the same port."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from manifests.data import RECORDS_HEADER, UPLOAD_PATH, BatchKey, CollectedRecord
from manifests.device import DeviceCredentials
from tests.engines import free_port
from tests.test_device_contracts import example_credentials

TOKEN = "ep_dev_data_hub_test_token_0000000000000000000"


@dataclass
class DataHub:
    port: int = field(default_factory=free_port)
    delay_s: float = 0.0  # before each answer, after storing: a window to kill the agent in
    stored: dict[str, tuple[BatchKey, list[CollectedRecord]]] = field(default_factory=dict)
    answers: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)  # scripted
    log: list[tuple[str, int]] = field(default_factory=list)  # digest, status answered
    problems: list[str] = field(default_factory=list)  # contract violations seen
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def credentials(self) -> DeviceCredentials:
        document: dict[str, Any] = example_credentials()
        document.update(hub_url=self.url, token=TOKEN)
        document.pop("ca_pem", None)
        return DeviceCredentials.model_validate(document)

    def start(self) -> DataHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                status, headers = hub.handle(self)
                body = json.dumps({"error": {"message": f"answer {status}"}}).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def records(self) -> list[CollectedRecord]:
        return [r for _, records in self.stored.values() for r in records]

    def handle(self, request: BaseHTTPRequestHandler) -> tuple[int, dict[str, str]]:
        url = urllib.parse.urlsplit(request.path)
        body = request.rfile.read(int(request.headers["Content-Length"]))
        digest = url.path.removeprefix(UPLOAD_PATH + "/")
        if request.headers["Authorization"] != f"Bearer {TOKEN}":
            return self._answer(digest, 401)
        if self.answers:
            status, headers = self.answers.popleft()
            return self._answer(digest, status, headers)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        key = BatchKey.model_validate(query)
        if digest != "sha256:" + hashlib.sha256(body).hexdigest():
            self.problems.append(f"{digest}: not the digest of the bytes")
            return self._answer(digest, 422)
        if request.headers["Content-Encoding"] != "gzip":
            self.problems.append(f"{digest}: not sent as gzip")
        lines = gzip.decompress(body).splitlines()
        records = [CollectedRecord.model_validate_json(line) for line in lines]
        if len(records) != int(request.headers[RECORDS_HEADER]):
            self.problems.append(f"{digest}: {RECORDS_HEADER} says {request.headers[RECORDS_HEADER]}")
        if any(r.key() != key for r in records):
            self.problems.append(f"{digest}: a record of another batch key")
        if digest in self.stored:
            return self._answer(digest, 200)
        self.stored[digest] = (key, records)
        if self.delay_s:
            time.sleep(self.delay_s)
        return self._answer(digest, 201)

    def _answer(
        self, digest: str, status: int, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str]]:
        self.log.append((digest, status))
        return status, headers or {}


def segments_in(state_dir: Path, service: str) -> list[Path]:
    return sorted((state_dir / "data" / service).glob("*.jsonl.gz"))
