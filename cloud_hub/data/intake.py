"""Collected data in one hub process: receiving a batch, serving one, and retention.

The HTTP layer (:mod:`cloud_hub.api.data`) reads the request; this does the blocking work, in
a worker thread: who the device is and whether it may send this service's data (before a
byte of the body is read), then, on the whole body spooled to an unnamed temp file, the
digest, the records, the store and the row with its event, in that order. The object is
written before its row: a crash between the two leaves an object that the device's retry
writes again under the same key, never a row without its bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

import anyio
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_hub.data import batches
from cloud_hub.data.budget import DataBudget
from cloud_hub.data.check import check_batch
from cloud_hub.data.store import DataStore
from cloud_hub.data.tables import DataBatch
from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.errors import Forbidden, NotFound, Throttled, Unauthorized
from cloud_hub.events import record_event
from cloud_hub.fleet.devices import token_hash, token_matches
from cloud_hub.fleet.tables import Device
from cloud_hub.settings import HubSettings
from manifests.data import BatchKey, StoredBatch, blob_key
from manifests.errors import TrustError

log = logging.getLogger(__name__)

MIB = 1 << 20
CHUNK = 1 << 20
#: What spooling a body reads at once: about what the server hands over per receive.
PIECE = 64 << 10
#: Event kind of a stored batch (sent to webhooks as ``edgepack.data.batch-received``).
EVENT_KIND = "data.batch-received"
#: How often retention looks for batches past their age (each look is a bounded query).
RETENTION_INTERVAL_S = 600.0


@dataclass(frozen=True)
class Admitted:
    device_id: str
    #: the batch as stored before, when this device sent the same bytes already
    stored: StoredBatch | None


class CollectedData:
    """What one hub process does with collected data; built by :func:`cloud_hub.wiring.wire_hub`."""

    def __init__(self, sessions: Sessions, store: DataStore, settings: HubSettings, spool_dir: Path) -> None:
        self.sessions = sessions
        self.store = store
        self.settings = settings
        self.spool_dir = spool_dir
        self.budget = DataBudget(settings.data_mb_per_hour * MIB, settings.data_burst_mb * MIB)
        self._budget_lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None
        self._last_retention = 0.0

    # --- receiving -------------------------------------------------------------------------

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The batches checked at once (each parses lines of up to 3 MiB: 16 at once grew the
        hub by 185 MiB). Made on first use, in the event loop that uses it."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.data_checks_in_flight)
        return self._limiter

    def admit(self, token: str, key: BatchKey, digest: str) -> Admitted:
        """The device the token is, if it may send ``key.service``'s data; the batch it sent
        before under ``digest``, if any. Reads no body."""
        grace = timedelta(days=self.settings.data_grace_days)
        with self.sessions.begin() as s:
            device_id = s.scalar(
                select(Device.id).where(token_matches(token_hash(token)))
            )
            if device_id is None:
                raise Unauthorized("device token is not valid (unknown or revoked device)")
            if not batches.may_send(s, device_id, key.service, now=utcnow(), grace=grace):
                raise Forbidden(
                    f"service {key.service!r} is not one device {device_id!r} runs or ran in the "
                    f"last {self.settings.data_grace_days:g} days; its data is not taken"
                )
            row = batches.find(s, device_id, digest)
            return Admitted(device_id, batches.stored(row) if row is not None else None)

    def charge(self, device_id: str, size: int) -> None:
        """Spend ``size`` bytes of the device's budget, or raise Throttled (429)."""
        with self._budget_lock:
            wait_s = self.budget.take(device_id, size, time.monotonic())
        if wait_s is not None:
            raise Throttled(
                f"device {device_id!r} uploaded more collected data than its budget of "
                f"{self.settings.data_mb_per_hour:g} MiB an hour; send this batch again later",
                retry_after_s=wait_s,
            )

    def spool(self, body: io.RawIOBase, digest: str) -> tuple[IO[bytes], int]:
        """The whole body in an unnamed temp file (the caller closes it) and its size, once its
        digest matched ``digest``."""
        spool = tempfile.TemporaryFile(dir=self.spool_dir)  # noqa: SIM115  (returned open)
        try:
            hasher, size = hashlib.sha256(), 0
            while chunk := body.read(PIECE):
                hasher.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            got = "sha256:" + hasher.hexdigest()
            if got != digest:
                raise TrustError(f"the batch's bytes have digest {got}, not {digest}; nothing was stored")
        except BaseException:
            spool.close()
            raise
        return spool, size

    def receive(
        self, spool: IO[bytes], size: int, *, device_id: str, key: BatchKey, digest: str, declared: int
    ) -> tuple[StoredBatch, bool]:
        """Check the spooled batch, store it and its row: (the stored batch, True when it is new).
        Holds up to a few lines of the batch in memory: run at most ``data_checks_in_flight``
        at once (:attr:`limiter`)."""
        spool.seek(0)
        summary = check_batch(spool, key, declared)
        path = blob_key(key, device_id, digest)
        spool.seek(0)
        self.store.put(path, spool, size)
        try:
            with self.sessions.begin() as s:
                row = batches.add(
                    s, device_id=device_id, digest=digest, key=key, size=size, summary=summary, path=path
                )
                record_event(
                    s,
                    EVENT_KIND,
                    f"{device_id} sent {summary.records} records of {key.service} ({key.model} "
                    f"{key.model_version}, {key.designation}, {key.day.isoformat()}): {size} bytes",
                    device_id=device_id,
                    service=key.service,
                )
                s.flush()
                return batches.stored(row), True
        except IntegrityError:
            # The same batch, sent twice at once: the other request stored it (the same bytes
            # under the same key).
            with self.sessions.begin() as s:
                again = batches.find(s, device_id, digest)
                if again is None:
                    raise
                return batches.stored(again), False

    # --- reading ---------------------------------------------------------------------------

    def find(self, service: str, digest: str, device: str | None) -> StoredBatch:
        with self.sessions.begin() as s:
            query = select(DataBatch).where(DataBatch.service == service, DataBatch.digest == digest)
            if device is not None:
                query = query.where(DataBatch.device_id == device)
            row = s.scalars(query.order_by(DataBatch.id).limit(1)).first()
            if row is None:
                raise NotFound(
                    f"service {service!r} has no data batch {digest}"
                    + (f" from {device!r}" if device else "")
                )
            return batches.stored(row)

    def chunks(self, batch: StoredBatch) -> Iterator[bytes]:
        """The batch's bytes, its object opened now: an object that is gone raises NotFound
        here, before the answer starts (inside the generator it would be a 200 cut off)."""
        fh = self.store.open(batch.path, batch.digest)
        return _read(fh)

    def delete(self, service: str, *, device: str | None, until: datetime | None) -> int:
        """Delete ``service``'s batches (one device's, received before ``until``, when given),
        objects then rows; return how many."""
        return self._delete_chunks(lambda s: batches.service_rows(s, service, device=device, until=until))

    def _delete_chunks(self, select_rows: Callable[[Session], list[tuple[int, str]]]) -> int:
        """Objects first, then their rows, a chunk at a time: a store that fails half way
        leaves rows that the next delete finds again (their download a 404 meanwhile), never
        objects that no row names and nothing would ever delete."""
        removed = 0
        while True:
            with self.sessions.begin() as s:
                rows = select_rows(s)
            for _, path in rows:
                self.store.delete(path)
            with self.sessions.begin() as s:
                batches.delete_rows(s, [row_id for row_id, _ in rows])
            removed += len(rows)
            if len(rows) < batches.PRUNE_CHUNK:
                return removed

    # --- retention -------------------------------------------------------------------------

    def prune_if_due(self) -> int:
        """Delete batches older than ``data_retention_days`` (0: keep them), at most every
        RETENTION_INTERVAL_S; return how many. Never raises (it runs in the upkeep loop)."""
        if time.monotonic() - self._last_retention < RETENTION_INTERVAL_S and self._last_retention:
            return 0
        self._last_retention = time.monotonic()
        try:
            return self.prune()
        except Exception:
            log.exception("could not prune collected data")
            return 0

    def prune(self) -> int:
        days = self.settings.data_retention_days
        now = utcnow()
        with self.sessions.begin() as s:
            batches.forget_old_sources(s, older_than=now - timedelta(days=self.settings.data_grace_days))
        if days == 0:
            return 0
        return self._delete_chunks(lambda s: batches.old_rows(s, older_than=now - timedelta(days=days)))


def _read(fh: IO[bytes]) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk
