"""A device's way to its hub through a proxy that can refuse chosen requests, for the agent
tests of a hub that answers some requests with an error for a while (5xx, 429 with
``Retry-After``). Everything else is passed to the real hub as it is.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from tests.agent.conftest import Agent

#: request headers that are the proxy's own business, not the hub's
_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "accept-encoding"}


@dataclass
class Refusal:
    """Requests whose path contains ``part`` get ``status`` (with ``Retry-After``, if set)."""

    part: str
    status: int = 503
    retry_after_s: int | None = None


@dataclass
class HubProxy:
    upstream: str
    refusals: list[Refusal] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # the paths refused so far
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refuse(self, part: str, status: int = 503, *, retry_after_s: int | None = None) -> None:
        with self._lock:
            self.refusals.append(Refusal(part, status, retry_after_s))

    def refusal_for(self, path: str) -> Refusal | None:
        with self._lock:
            found = next((r for r in self.refusals if r.part in path), None)
            if found is not None:
                self.refused.append(path)
            return found


@contextmanager
def hub_proxy(agent: Agent) -> Iterator[HubProxy]:
    """Point ``agent`` (not started yet) at a proxy of its hub for the ``with`` block."""
    proxy = HubProxy(agent.credentials["hub_url"].rstrip("/"))
    upstream = httpx.Client(base_url=proxy.upstream, timeout=60)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _forward(self) -> None:
            refusal = proxy.refusal_for(self.path)
            if refusal is not None:
                body = json.dumps({"detail": "refused by the test's proxy"}).encode()
                self.send_response(refusal.status)
                if refusal.retry_after_s is not None:
                    self.send_header("Retry-After", str(refusal.retry_after_s))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            answer = upstream.request(self.command, self.path, content=data, headers=headers)
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in _HOP | {"content-encoding"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        do_GET = do_POST = do_PUT = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    credentials = {**agent.credentials, "hub_url": f"http://127.0.0.1:{server.server_address[1]}"}
    path = agent.config.credentials
    path.write_text(json.dumps(credentials))
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        upstream.close()
