"""Every socket the hub accepts: a bounded number of them, each with a head and a body timeout.

uvicorn closes a connection idle between two requests (``timeout_keep_alive``) and nothing
else: a client that opens a connection and sends half a request head, or a head and then a
body one byte a minute, held its socket (and the request's buffers) for ever, and nothing
bounded how many such sockets one hub process kept. This protocol adds, per hub process
(docs/security.md §13 names the settings):

- **a bound on open connections** (``max_connections``): at the bound, a new connection closes
  the oldest idle one (between requests, or still sending its head); when every connection is
  busy with a request the new one is answered 503 and closed;
- **a head timeout** (``header_timeout_s``): a request head not complete that long after the
  connection opened (or after the previous response) is answered 408 and closed;
- **a head size bound** (``max_head_kb``): llhttp gathers a header of any length, so a head
  that grows past it is answered 431 and closed;
- **a body progress timeout**: a body that brings no byte for ``body_timeout_s``, or less than
  ``body_min_bytes_per_s`` on average over a window of ``body_timeout_s``, is answered 408 and
  closed. Time in which the hub itself is not reading (the route has not taken the last 64 KiB
  yet, or has not asked for a ``100-continue`` body) does not count, so a slow route never
  costs a client its upload.

One sweep per process, a few times a second, looks at every connection (the scoring server's
guard, ``edge_agent/scoring/limits.py``, does the same: a timer armed and cancelled per request
cost throughput). The requests themselves take uvicorn's httptools path unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cloud_hub.settings import HubSettings


def _raw_response(status: bytes, kind: bytes, message: bytes) -> bytes:
    body = b'{"error": {"type": "%s", "message": "%s"}}' % (kind, message)
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n" % len(body) + body
    )


_408 = b"408 Request Timeout"
_BUSY = _raw_response(b"503 Service Unavailable", b"Busy", b"too many connections; try again later")


@dataclass(frozen=True)
class SocketLimits:
    """What one hub process gives the clients that reach its port (see the module doc)."""

    max_connections: int
    header_timeout_s: float
    max_head_bytes: int
    body_timeout_s: float
    body_min_bytes_per_s: int

    @classmethod
    def of(cls, settings: HubSettings) -> SocketLimits:
        return cls(
            max_connections=settings.max_connections,
            header_timeout_s=settings.header_timeout_s,
            max_head_bytes=settings.max_head_kb << 10,
            body_timeout_s=settings.body_timeout_s,
            body_min_bytes_per_s=settings.body_min_bytes_per_s,
        )


def guarded_protocol(limits: SocketLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the connection bound, the head bound and the timeouts."""
    sweep_every = min(1.0, limits.header_timeout_s / 4, limits.body_timeout_s / 4)

    class HubHttpProtocol(HttpToolsProtocol):
        _swept: ClassVar[set[Any] | None] = None  # this server's connections, once known
        # The order connections came in: uvloop's clock is read once per loop iteration, so
        # connections accepted together have the same time.
        _arrivals: ClassVar[Iterator[int]] = itertools.count()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._arrival = 0
            self._head_since: float | None = None  # waiting for a request head since then
            self._heads = 0  # request heads begun on this connection
            self._head_bytes = 0
            self._window_start = 0.0  # the current body-progress window
            self._window_bytes = 0
            self._progress_at = 0.0  # when body bytes last came (or the hub last paused)
            # Between a head and the end of its body. (uvicorn's ``cycle.more_body`` stays
            # True for good when the answer went out before the body ended.)
            self._in_body = False

        def _busy(self) -> bool:
            """A request head arrived and its response is not complete (uvicorn's own state)."""
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arrival = next(self._arrivals)
            self._head_since = self.loop.time()
            cls = type(self)
            if cls._swept is None:
                cls._swept = self.connections
                self.loop.call_later(sweep_every, self._sweep)
            if len(self.connections) > limits.max_connections and not self._evict_idle():
                transport.write(_BUSY)
                transport.close()

        def _evict_idle(self) -> bool:
            """Close the oldest idle connection (not this one); False when all are busy."""
            idle = [
                c
                for c in self.connections
                if c is not self and isinstance(c, HubHttpProtocol) and not c._busy()
                and not c.transport.is_closing()
            ]
            if not idle:
                return False
            min(idle, key=lambda c: c._arrival).transport.close()
            return True

        def data_received(self, data: bytes) -> None:
            heads = self._heads
            pending = self._head_since is not None
            super().data_received(data)
            # Counted only while one head is pending across the whole read: a read that ends a
            # body (answered early, its rest still coming) may hold up to 256 KiB of that body
            # before the next head begins, and a read that begins a head may end the body
            # before it; either goes uncounted (at most one read), never a body's bytes
            # counted as a head's.
            if (
                pending
                and self._head_since is not None
                and self._heads == heads
                and not self.transport.is_closing()
            ):
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_head_bytes:
                    message = b"request head larger than %d bytes" % limits.max_head_bytes
                    self._refuse(b"431 Request Header Fields Too Large", b"TooLarge", message)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._heads += 1
            self._head_bytes = 0
            if self._head_since is None:  # a request right behind a body (pipelined)
                self._head_since = self.loop.time()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._between_requests()

        def on_message_complete(self) -> None:
            self._in_body = False
            super().on_message_complete()
            self._between_requests()  # a body that came in after its (early) answer

        def _between_requests(self) -> None:
            """Start the next head's clock once the request and its answer are both done.
            uvicorn's keep-alive timer closes an idle connection, but any byte cancels it,
            even one that begins no request (llhttp skips blank lines) or the rest of a body
            answered early; then nothing else would."""
            cycle = self.cycle
            if (
                self._head_since is None
                and not self.pipeline
                and cycle is not None
                and cycle.response_complete
                and not self._in_body
            ):
                self._head_since = self.loop.time()
                self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._head_since = None
            self._in_body = True
            self._window_start = self._progress_at = self.loop.time()
            self._window_bytes = 0
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._window_bytes += len(body)
            self._progress_at = self.loop.time()
            super().on_body(body)

        def _sweep(self) -> None:
            now = self.loop.time()
            for conn in list(type(self)._swept or ()):
                if isinstance(conn, HubHttpProtocol) and not conn.transport.is_closing():
                    conn._check(now)
            self.loop.call_later(sweep_every, self._sweep)

        def _check(self, now: float) -> None:
            if self._head_since is not None:
                if now - self._head_since > limits.header_timeout_s:
                    self._refuse(_408, b"RequestTimeout", b"request head not received in time")
                return
            cycle = self.cycle
            if cycle is None or not self._in_body:
                return  # no body on its way
            if self.flow.read_paused or cycle.waiting_for_100_continue:
                # The hub's turn, not the client's: the clocks start when it reads again.
                self._window_start = self._progress_at = now
                self._window_bytes = 0
                return
            if now - self._progress_at > limits.body_timeout_s:
                self._refuse(_408, b"RequestTimeout", b"request body stalled")
                return
            elapsed = now - self._window_start
            if elapsed < limits.body_timeout_s:
                return
            if self._window_bytes < limits.body_min_bytes_per_s * elapsed:
                self._refuse(_408, b"RequestTimeout", b"request body too slow")
            else:
                self._window_start, self._window_bytes = now, 0

        def _refuse(self, status: bytes, kind: bytes, message: bytes) -> None:
            cycle = self.cycle
            # Never into the middle of a response (a client that pipelines a head it never ends).
            if cycle is None or cycle.response_complete or not cycle.response_started:
                self.transport.write(_raw_response(status, kind, message))
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the route sees the client gone, never half a body
                cycle.message_event.set()
            self.transport.close()

    return HubHttpProtocol
