"""A request body, read as a plain blocking file by code running in a worker thread.

Uploads (module pushes, model files) can be gigabytes, so they are never held in memory or
spooled to a second file: the ASGI body's chunks are pulled on demand, one at a time, from
the event loop (``anyio.from_thread``) while the blocking verifier/blob store runs in a
thread, and the byte limit is enforced as the bytes arrive.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import anyio.from_thread
from starlette.requests import ClientDisconnect

from cloud_hub.errors import TooLarge
from manifests.errors import FetchError

MIB = 1 << 20
# How much of a refused upload is still read (and dropped) so that the client sees the
# error response instead of a reset connection; beyond this the connection is just closed.
DRAIN_LIMIT = 64 * MIB


def too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"upload is larger than the hub's limit of {limit // MIB} MiB ({limit} bytes); "
        "raise EDGEPACK_HUB_MAX_UPLOAD_MB on the hub if this is intended"
    )


def check_declared_length(header: str | None, limit: int) -> None:
    """Refuse at once when ``Content-Length`` already says the body is too large."""
    if header is not None and header.isdigit() and int(header) > limit:
        raise too_large(limit)


class AsyncBodyReader(io.RawIOBase):
    """A blocking, read-only file over an async chunk iterator; use from a worker thread."""

    def __init__(self, chunks: AsyncIterator[bytes], *, limit: int) -> None:
        self._chunks = chunks
        self._limit = limit
        self._pending = memoryview(b"")
        self._eof = False
        self.received = 0

    def readable(self) -> bool:
        return True

    async def _next(self) -> bytes | None:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None
        except ClientDisconnect:
            self._eof = True
            raise FetchError(
                f"the client disconnected after {self.received} bytes; nothing was stored"
            ) from None

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._eof:
            chunk = anyio.from_thread.run(self._next)
            if chunk is None:
                self._eof = True
                break
            self.received += len(chunk)
            if self.received > self._limit:
                raise too_large(self._limit)
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    async def drain(self) -> None:
        """Read and drop what is left of the body (up to DRAIN_LIMIT), on the event loop."""
        if self._eof:
            return
        dropped = 0
        try:
            async for chunk in self._chunks:
                dropped += len(chunk)
                if dropped > DRAIN_LIMIT:
                    return
        except ClientDisconnect:
            pass  # nobody left to answer; the handler's response goes nowhere
        self._eof = True


def body_file(chunks: AsyncIterator[bytes], *, limit: int) -> tuple[AsyncBodyReader, io.BufferedReader]:
    """The raw reader (for ``drain``/``received``) and a buffered file over it."""
    raw = AsyncBodyReader(chunks, limit=limit)
    return raw, io.BufferedReader(raw, buffer_size=MIB)
