"""The scoring server under hostile clients: bounded connections, read timeouts, stuck run().

A module listens on the device's network, where anyone may connect. Without limits, a client
that opens connections and never finishes a request (slowloris), or drips a body one byte a
second, holds a worker's sockets for ever; a ``run()`` that never returns freezes the worker
for every client after it. This module adds, per worker:

- **a bound on open connections** (``max_connections``): at the bound, a new connection
  evicts the oldest one that is idle (keep-alive between requests, or still sending its request
  head); when every connection is busy with a request the new one is answered 503 and closed;
- **a header timeout**: a request head not complete ``header_timeout_s`` after the connection
  opened (or after the first byte of a later request) is answered 408 and the connection closed;
- **a body timeout**: a request body not complete ``body_timeout_s`` after its head is
  answered 408 and the connection closed (the app then sees the client gone and never calls
  ``run()`` on the partial body);
- **a run() timeout** (``run_timeout_s``): a watchdog thread answers 504 on the connection whose
  ``run()`` overran and ends the worker process; its supervisor starts a fresh one (Python cannot
  stop a thread stuck in C code, so the process is what gets replaced).

The protocol is uvicorn's httptools protocol with these hooks; requests themselves take the
same path as before, so the hot path gains two attribute writes and an uncontended lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edge_agent.scoring.exit_codes import EXIT_STUCK
from manifests.errors import ConfigError

log = logging.getLogger("edge_agent.scoring")

#: The ASGI scope extension carrying the connection's raw socket fd (-1 under TLS).
FD_EXTENSION = "edgepack.fd"

_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
_503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"


def _raw_response(head: bytes, body: bytes) -> bytes:
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


@dataclass(frozen=True)
class ServingLimits:
    """Per-worker limits; ``run_timeout_s`` None leaves run() unbounded (and the server
    unsupervised when it has one worker)."""

    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    run_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError(f"max connections must be at least 1, not {self.max_connections}")
        for name in ("header_timeout_s", "body_timeout_s", "run_timeout_s"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 86400:
                what = name.removesuffix("_s").replace("_", " ")
                raise ConfigError(f"{what} must be more than 0 and at most 86400 s, not {value}")


def guarded_protocol(limits: ServingLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the connection bound and the header timeout."""

    class GuardedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._busy = False  # a request head arrived and its response is not complete
            self._opened = 0.0
            self._header_timer: asyncio.TimerHandle | None = None
            self._body_timer: asyncio.TimerHandle | None = None
            self._body_done = True
            self._fd = -1

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened = self.loop.time()
            sock = transport.get_extra_info("socket")
            if sock is not None and transport.get_extra_info("sslcontext") is None:
                self._fd = sock.fileno()
            if len(self.connections) > limits.max_connections and not self._evict_idle():
                body = b'{"error": "too many connections; try again later", "type": "Busy"}'
                transport.write(_raw_response(_503, body))
                transport.close()
                return
            self._arm_header_timer()

        def _evict_idle(self) -> bool:
            """Close the oldest idle connection (not this one); False when all are busy."""
            idle = [
                c
                for c in self.connections
                if c is not self and isinstance(c, GuardedHttpProtocol) and not c._busy
            ]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c._opened)
            oldest.transport.close()
            return True

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and not self._busy:
                body = b'{"error": "request head not received in time", "type": "RequestTimeout"}'
                self.transport.write(_raw_response(_408, body))
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {FD_EXTENSION: {"fd": self._fd}}
            self._arm_header_timer()  # a later request on a kept-alive connection: its own deadline

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            self._busy = True
            self._body_done = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._body_done = True
            self._cancel_body_timer()
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Armed only when a body is still outstanding after the bytes at hand: most
            # requests arrive whole in one segment and never pay for a timer.
            waiting = self._busy and not self._body_done and self._body_timer is None
            if waiting and not self.transport.is_closing():
                self._body_timer = self.loop.call_later(limits.body_timeout_s, self._body_timeout)

        def _cancel_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _body_timeout(self) -> None:
            self._body_timer = None
            if not self.transport.is_closing() and not self._body_done:
                body = b'{"error": "request body not received in time", "type": "RequestTimeout"}'
                self.transport.write(_raw_response(_408, body))
                self.transport.close()

        def on_response_complete(self) -> None:
            self._busy = False
            self._cancel_body_timer()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            self._cancel_body_timer()
            super().connection_lost(exc)

    return GuardedHttpProtocol


class RunWatchdog:
    """Answers 504 for a ``run()`` that overruns its timeout, then ends this process.

    ``begin``/``end`` bracket each call on the event loop's thread; a daemon thread looks every
    few milliseconds. Both sides hold one lock while they decide, so a run() that returns at
    the last moment either gets its own answer or the 504, never both.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._since = 0.0
        self._fd = -1
        self._thread = threading.Thread(target=self._watch, name="edgepack-run-watchdog", daemon=True)
        self._thread.start()

    def begin(self, fd: int) -> None:
        with self._lock:
            self._fd = fd
            self._since = time.monotonic()

    def end(self) -> None:
        with self._lock:
            self._since = 0.0

    def _watch(self) -> None:
        period = min(0.05, self.timeout_s / 10)
        while True:
            time.sleep(period)
            with self._lock:
                if self._since and time.monotonic() - self._since > self.timeout_s:
                    self._fire()

    def _fire(self) -> None:
        log.error("run() did not return within %s s; answering 504 and replacing this worker", self.timeout_s)
        if self._fd >= 0:
            body = (
                b'{"error": "run() did not return within %s s; the worker is being replaced", '
                b'"type": "Timeout"}' % str(self.timeout_s).encode()
            )
            head = b"HTTP/1.1 504 Gateway Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            try:
                os.write(self._fd, _raw_response(head, body))
            except OSError as exc:
                log.warning("could not answer the timed-out request: %s", exc)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_STUCK)
