"""Clients that flood a scoring server with large request bodies, and the server's memory.

Each client opens its own connection and sends one request head and as much of a large body as
the server takes (announced by ``Content-Length``, or chunked), then reads whatever the server
answered. Meanwhile the resident memory of the server's processes (``VmRSS`` of the process
and every descendant, from ``/proc``) is sampled; the peak is what a device's memory would have
to hold. Used by the hostile-client tests and by ``bench/scoring_memory.py``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PIECE = b"x" * (1 << 20)
_PROC = Path("/proc")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in (_PROC / str(pid) / "task").glob("*"):
        try:
            out.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def process_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and all its descendants (workers, their helpers), now."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = (_PROC / str(current) / "status").read_text()
        except OSError:
            continue  # it ended meanwhile
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        pending.extend(_children(current))
    return total


@dataclass
class RssSampler:
    """The peak of :func:`process_rss` while it runs (sampled every ``period_s``)."""

    pid: int
    period_s: float = 0.01
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.peak = process_rss(self.pid)
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, process_rss(self.pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, process_rss(self.pid))


def status_of(answer: bytes) -> str:
    """The HTTP status of an answer as text ("413"), or what happened instead."""
    if answer.startswith(b"HTTP/1.1 "):
        return answer[9:12].decode()
    return "no answer" if not answer else "garbage"


def send_large_body(
    host: str, port: int, body_bytes: int, *, chunked: bool, headers: bytes = b"", timeout_s: float = 60
) -> bytes:
    """One client: sends a ``body_bytes`` body (until the server stops taking it) and returns
    what the server answered (b"" for nothing, b"reset" when the connection was reset)."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % body_bytes
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: s\r\n" + headers + framing + b"\r\n\r\n")
        sent = 0
        try:
            while sent < body_bytes:
                piece = PIECE[: min(len(PIECE), body_bytes - sent)]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed: its answer may still be readable
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break  # the head says enough
        except ConnectionResetError:
            return answer or b"reset"
        except TimeoutError:
            pass
        return answer


def send_large_head(host: str, port: int, head_bytes: int, *, timeout_s: float = 60) -> bytes:
    """One client: sends a request head with ``head_bytes`` of headers (until the server stops
    taking them) and returns what the server answered, as :func:`send_large_body`."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(b"GET /score HTTP/1.1\r\nHost: s\r\n")
        sent = 0
        try:
            while sent < head_bytes:
                sock.sendall(b"X-Filler: %s\r\n" % PIECE[: min(len(PIECE), head_bytes - sent)])
                sent += len(PIECE)
            sock.sendall(b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            return answer or b"reset"
        except TimeoutError:
            pass
        return answer


@dataclass
class Flood:
    """``clients`` clients at once, each sending one ``body_bytes`` body."""

    host: str
    port: int
    clients: int
    body_bytes: int
    chunked: bool = False
    headers: bytes = b""
    statuses: Counter[str] = field(default_factory=Counter)

    def run(self) -> Counter[str]:
        lock = threading.Lock()

        def client() -> None:
            try:
                answer = send_large_body(
                    self.host, self.port, self.body_bytes, chunked=self.chunked, headers=self.headers
                )
                outcome = status_of(answer) if answer != b"reset" else "reset"
            except OSError as exc:
                outcome = type(exc).__name__
            with lock:
                self.statuses[outcome] += 1

        threads = [threading.Thread(target=client, name=f"flood-{i}") for i in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self.statuses


def settle_rss(pid: int, seconds: float = 1.0) -> int:
    """The server's memory once it had a moment after start-up or an attack."""
    time.sleep(seconds)
    return process_rss(pid)
