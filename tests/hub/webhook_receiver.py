"""A real webhook receiver on loopback (http.server in a thread) whose behaviour a test sets:
answer 2xx, fail with 500, hang, or redirect. Every delivery it accepts is verified with
``standardwebhooks`` and kept, in arrival order."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    url: str = ""
    #: "ok", "fail" (500), "hang" (no answer for hang_s), or "redirect" (302 to redirect_to)
    mode: str = "ok"
    hang_s: float = 30.0
    redirect_to: str = ""
    secret: str | None = None
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def ids(self) -> list[str]:
        with self.lock:
            return [r.headers["webhook-id"] for r in self.received]

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.event for r in self.received]

    def wait_attempts(self, count: int, timeout: float = 10.0) -> int:
        """Wait until the hub tried at least ``count`` deliveries (answered or not); how many."""
        deadline = time.monotonic() + timeout
        while self.attempts < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.attempts

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(set(self.ids())) >= count:
                return self.events()
            time.sleep(0.02)
        raise AssertionError(f"{len(set(self.ids()))} distinct deliveries of {count} arrived at {self.url}")


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with receiver.lock:
                receiver.attempts += 1
                mode = receiver.mode
            if mode == "hang":
                time.sleep(receiver.hang_s)
                return
            if mode == "redirect":
                self.send_response(302)
                self.send_header("location", receiver.redirect_to)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if mode == "fail":
                self.send_response(500)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            if receiver.secret is not None:
                # Raises (and so fails the request, and the test) on a wrong signature.
                Webhook(receiver.secret).verify(body, headers)
            with receiver.lock:
                receiver.received.append(Received(headers, body))
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

    return Handler


def start_receiver() -> Receiver:
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    server.daemon_threads = True
    receiver.server = server
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return receiver
