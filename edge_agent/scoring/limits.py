"""The scoring server under hostile clients: bounded connections, read timeouts, stuck run().

A module listens on the device's network, where anyone may connect. Without limits, a client
that opens connections and never finishes a request (slowloris), or drips a body one byte a
second, holds a worker's sockets for ever; a ``run()`` that never returns freezes the worker
for every client after it. This module adds, per worker:

- **a bound on open connections** (``max_connections``): at the bound, a new connection
  evicts the oldest one that is idle (keep-alive between requests, or still sending its request
  head); when every connection is busy with a request the new one is answered 503 and closed;
- **a header timeout**: a request head not complete ``header_timeout_s`` after the connection
  opened (or after the first byte of a later request) is answered 408 and the connection closed
  (kept-alive connections between requests are uvicorn's keep-alive timeout's business);
- **a body timeout**: a request body not complete ``body_timeout_s`` after its head is
  answered 408 and the connection closed (the app then sees the client gone and never calls
  ``run()`` on the partial body);
- **a run() timeout** (``run_timeout_s``): a watchdog thread answers 504 on the connection whose
  ``run()`` overran and ends the worker process; its supervisor starts a fresh one (Python cannot
  stop a thread stuck in C code, so the process is what gets replaced).
- **a bound on request heads** (``max_head_bytes``): a request line and headers that grow past
  it before they are complete are answered 431 and the connection closed (uvicorn itself keeps
  any head whole, however large: four clients sending 100 MB of headers took 350 MB);
- **a bound on request bodies** (``max_body_bytes``): a body announced larger is answered 413
  before any of it is read, a chunked one as soon as it grows past the bound;
- **a budget for all bodies in flight** (``max_body_bytes_in_flight``): the bytes of every
  request body the worker holds (being received, or waiting for and in ``run()``) add up to at
  most this; a request that would pass it is answered 503 with ``Retry-After``, before its body
  is read when its ``Content-Length`` says so (:class:`BodyBudget`). Without it, 512 connections
  times a 100 MiB body each let anyone who reaches the port take gigabytes from the model.

The protocol is uvicorn's httptools protocol with these hooks; requests themselves take the
same path as before, so the hot path gains a few attribute writes (and, with a run() timeout,
an uncontended lock).
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
from manifests.desired import (
    BODIES_IN_FLIGHT,
    DEFAULT_MAX_BODY_BYTES,
    MAX_BODY_BYTES_BOUND,
    MAX_BODY_BYTES_IN_FLIGHT_BOUND,
)
from manifests.errors import ConfigError

log = logging.getLogger("edge_agent.scoring")

#: The ASGI scope extension carrying the connection's raw socket fd (-1 under TLS).
FD_EXTENSION = "edgepack.fd"

#: A request head (request line and headers) larger than this is refused: Azure's server (gunicorn)
#: takes lines of 4 KiB, and a GET /score whose query carries the input fits in far less.
DEFAULT_MAX_HEAD_BYTES = 64 << 10

_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\n"
)
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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_body_bytes_in_flight: int | None = None  # None: BODIES_IN_FLIGHT times max_body_bytes
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError(f"max connections must be at least 1, not {self.max_connections}")
        if not 1 <= self.max_body_bytes <= MAX_BODY_BYTES_BOUND:
            raise ConfigError(
                f"max body bytes must be at least 1 and at most {MAX_BODY_BYTES_BOUND}, "
                f"not {self.max_body_bytes}"
            )
        if not 1024 <= self.max_head_bytes <= MAX_BODY_BYTES_BOUND:
            raise ConfigError(
                f"max head bytes must be at least 1024 and at most {MAX_BODY_BYTES_BOUND}, "
                f"not {self.max_head_bytes}"
            )
        in_flight = self.max_body_bytes_in_flight
        if in_flight is not None and not self.max_body_bytes <= in_flight <= MAX_BODY_BYTES_IN_FLIGHT_BOUND:
            raise ConfigError(
                f"max body bytes in flight must be at least the max body bytes ({self.max_body_bytes}: "
                f"else no request of that size could ever be served) and at most "
                f"{MAX_BODY_BYTES_IN_FLIGHT_BOUND}, not {in_flight}"
            )
        for name in ("header_timeout_s", "body_timeout_s", "run_timeout_s"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 86400:
                what = name.removesuffix("_s").replace("_", " ")
                raise ConfigError(f"{what} must be more than 0 and at most 86400 s, not {value}")

    @property
    def body_budget(self) -> int:
        """The bytes of request bodies one worker may hold at once."""
        if self.max_body_bytes_in_flight is not None:
            return self.max_body_bytes_in_flight
        return BODIES_IN_FLIGHT * self.max_body_bytes


class BodyBudget:
    """What one worker's request bodies hold, and what may still come in (one per worker:
    every request of the worker runs on its one event loop thread, so plain integers do).

    A body is charged as its bytes arrive, never by what its head announces: a client that
    announces a large body and sends nothing holds no part of the budget.
    """

    __slots__ = ("held", "limit", "max_body")

    def __init__(self, max_body: int, limit: int) -> None:
        self.max_body = max_body
        self.limit = limit
        self.held = 0

    def refuse_announced(self, declared: int) -> int:
        """0 when a body of ``declared`` bytes may start, else the status that refuses it
        (413: larger than any body may be; 503: it would not fit beside the others now)."""
        if declared > self.max_body:
            return 413
        if self.held + declared > self.limit:
            return 503
        return 0

    def take(self, body_size: int, chunk: int) -> int:
        """Charge ``chunk`` more bytes of a body that has ``body_size`` bytes with them: 0 when
        they are charged, else the refusing status (as :meth:`refuse_announced`), nothing charged."""
        if body_size > self.max_body:
            return 413
        if self.held + chunk > self.limit:
            return 503
        self.held += chunk
        return 0

    def give_back(self, size: int) -> None:
        self.held -= size


def guarded_protocol(limits: ServingLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the connection bound and the read timeouts.

    The timeouts cost a request no timer: each connection notes when its current head (or
    body) started, and one sweep per worker, a few times a second, closes the ones that took
    too long. (A timer armed and cancelled per request cost about a tenth of the throughput.)
    """
    sweep_every = min(1.0, limits.header_timeout_s / 4, limits.body_timeout_s / 4)
    with_fd = limits.run_timeout_s is not None

    class GuardedHttpProtocol(HttpToolsProtocol):
        _swept: set[Any] | None = None  # the connections of this worker's server, once known

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._opened = 0.0
            self._head_since: float | None = None  # waiting for a request head since then
            self._head_bytes = 0  # of the head not yet complete
            self._body_since = 0.0  # when the current request's head was complete
            self._fd = -1

        def _busy(self) -> bool:
            """A request head arrived and its response is not complete (uvicorn's own state,
            read here rather than tracked per request)."""
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened = self._head_since = self.loop.time()
            if with_fd:
                sock = transport.get_extra_info("socket")
                if sock is not None and transport.get_extra_info("sslcontext") is None:
                    self._fd = sock.fileno()
            cls = type(self)
            if cls._swept is None:
                cls._swept = self.connections
                self.loop.call_later(sweep_every, self._sweep)
            if len(self.connections) > limits.max_connections and not self._evict_idle():
                body = b'{"error": "too many connections; try again later", "type": "Busy"}'
                transport.write(_raw_response(_503, body))
                transport.close()

        def _evict_idle(self) -> bool:
            """Close the oldest idle connection (not this one); False when all are busy."""
            idle = [
                c
                for c in self.connections
                if c is not self and isinstance(c, GuardedHttpProtocol) and not c._busy()
            ]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c._opened)
            oldest.transport.close()
            return True

        def _sweep(self) -> None:
            connections = type(self)._swept
            now = self.loop.time()
            for conn in list(connections or ()):
                if not isinstance(conn, GuardedHttpProtocol) or conn.transport.is_closing():
                    continue
                head = conn._head_since
                if head is not None and now - head > limits.header_timeout_s:
                    conn._time_out(b"request head not received in time")
                elif (
                    conn._busy()
                    and conn.cycle.more_body
                    and now - conn._body_since > limits.body_timeout_s
                ):
                    conn._time_out(b"request body not received in time")
            self.loop.call_later(sweep_every, self._sweep)

        def _time_out(self, message: bytes) -> None:
            body = b'{"error": "%s", "type": "RequestTimeout"}' % message
            self.transport.write(_raw_response(_408, body))
            self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if with_fd:
                self.scope["extensions"] = {FD_EXTENSION: {"fd": self._fd}}
            if self._head_since is None:  # a later request on a kept-alive connection
                self._head_since = self.loop.time()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Counted only when the head is still incomplete after ``data``: then all of it was
            # head (the head bytes of a read that completes the head are not, one read at most).
            if self._head_since is not None and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_head_bytes:
                    body = b'{"error": "request head is larger than %d bytes", "type": "HeadTooLarge"}' % (
                        limits.max_head_bytes
                    )
                    self.transport.write(_raw_response(_431, body))
                    self.transport.close()

        def on_headers_complete(self) -> None:
            self._head_since = None
            self._head_bytes = 0
            self._body_since = self.loop.time()
            super().on_headers_complete()

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
