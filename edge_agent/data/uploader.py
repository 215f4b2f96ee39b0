"""The agent's data uploader: keeps every service's spool within its quota and sends its
closed segments to the hub, oldest first, whenever the hub can be reached.

One thread, apart from the reconcile loop (which it never waits for, nor the other way round).
Every ``scan_interval_s`` it looks at ``<state_dir>/data/*/``:

- **quota**: while a spool holds more than its quota (``dataCollection.spoolQuotaMb``) or more
  than :data:`~edge_agent.data.spool.MAX_SEGMENTS` files, the oldest segment is deleted and its
  records (the count is in its name) are added to the service's ``dropped`` figure, logged;
- **hygiene**: the folder is shared with the module's code, so anything that is no segment
  (another name, a link, a folder, a file over the batch bound) is removed, and a writer's temp
  file left for :data:`STALE_TEMP_S` (its process died mid-write) too;
- **upload**: the oldest segment of each service in turn (round robin, so one service's backlog
  does not hold back another's) is sent as one batch (``manifests.data``); 201 or 200 delete
  it, a permanent refusal (4xx) deletes it and counts and logs it, anything else (the network,
  5xx, 429, 401) waits a full-jitter backoff (or the hub's ``Retry-After``) and tries again.
  The batch id is the digest of the bytes, so a batch sent twice (the agent died between the
  hub's answer and the delete) is stored once.

Everything is on disk: an agent that restarts goes on where it stopped (counts start again at
zero). A service that is no longer assigned keeps its spool until it is uploaded, under the
quota it had (the default quota after a restart), then its folder goes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from edge_agent.backoff import full_jitter
from edge_agent.data.spool import DATA_DIR, MAX_SEGMENTS, Listing, Segment, list_spool
from manifests.desired import DEFAULT_DATA_SPOOL_MB, DesiredState
from manifests.errors import FetchError, HubRefused
from manifests.module import NAME_PATTERN

if TYPE_CHECKING:
    # The batch contract, gzip and their models load with the first batch to read: most
    # devices collect no data, and an idle agent should not carry them (docs/agent.md).
    from manifests.data import BatchKey

log = logging.getLogger(__name__)

_NAME = re.compile(NAME_PATTERN)

#: A writer's temp file older than this (seconds) was left by a process that died mid-write.
STALE_TEMP_S = 600.0

#: The quota warning of a service is logged once a minute at most (seconds).
WARN_EVERY_S = 60.0

#: Sends one batch; returns the hub's status (200/201) or raises HubUnavailable/HubRefused.
Send = Callable[[str, "BatchKey", bytes, int], int]


@dataclass(frozen=True)
class UploaderSettings:
    scan_interval_s: float = 1.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    #: The longest ``Retry-After`` of the hub (its budget for this device) that is honoured.
    max_retry_after_s: float = 3600.0
    #: Batches sent per scan at most, so that quota and hygiene keep their pace during a backlog.
    max_batches_per_scan: int = 64
    max_segments: int = MAX_SEGMENTS
    default_quota_bytes: int = DEFAULT_DATA_SPOOL_MB << 20
    stale_temp_s: float = STALE_TEMP_S
    #: How long the empty spool of a service no longer assigned stays before it is removed.
    remove_empty_after_s: float = 600.0


@dataclass(frozen=True)
class SpoolFigures:
    """What the telemetry reports of one service's spool."""

    spooled_bytes: int
    dropped_total: int  # records dropped over the quota since the agent started


def quotas_of(desired: DesiredState | None) -> dict[str, int]:
    """Each collecting service's spool quota in bytes, from the applied desired state."""
    if desired is None:
        return {}
    return {
        a.service: a.settings.data_collection.spool_quota_mb << 20
        for a in desired.modules
        if a.settings.data_collection is not None
    }


class Damaged(Exception):
    """A segment that cannot be a batch (not gzip, no record, another service's records)."""


def read_batch(segment: Segment, service: str) -> tuple[str, BatchKey, bytes]:
    """The segment's digest, batch key (from its first record, checked) and bytes. Opened
    without following a link; at most :data:`manifests.data.MAX_BATCH_BYTES` read."""
    import gzip

    from manifests.data import MAX_BATCH_BYTES, MAX_RECORD_BYTES, CollectedRecord

    try:
        fd = os.open(segment.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise Damaged(f"cannot open it ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_BATCH_BYTES + 1)
    if len(data) > MAX_BATCH_BYTES:
        raise Damaged(f"over {MAX_BATCH_BYTES} bytes")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as unzipped:
            first = unzipped.readline(MAX_RECORD_BYTES + 1)
        record = CollectedRecord.model_validate_json(first)
    except (OSError, EOFError, ValidationError) as exc:
        raise Damaged(f"its first record does not read ({type(exc).__name__})") from None
    if record.service != service:
        raise Damaged(f"it holds records of service {record.service!r}, not {service!r}")
    return "sha256:" + hashlib.sha256(data).hexdigest(), record.key(), data


class Uploader:
    def __init__(
        self,
        state_dir: Path,
        send: Send,
        quotas: Callable[[], Mapping[str, int]],
        *,
        settings: UploaderSettings = UploaderSettings(),
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.root = state_dir / DATA_DIR
        self._send = send
        self._quotas = quotas
        self.settings = settings
        self._clock, self._rand = clock, rand
        self._known_quota: dict[str, int] = {}
        self._warned_at: dict[str, float] = {}
        self._empty_since: dict[str, float] = {}
        self._lock = threading.Lock()
        self._figures: dict[str, SpoolFigures] = {}
        self._dropped: dict[str, int] = {}
        self.uploaded = 0  # batches
        self.refused = 0  # batches the hub refused for good
        self.damaged = 0  # segments removed unread
        self._attempt = 0
        self._not_before = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgepack-data-upload", daemon=True)

    # --- the thread --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:  # a file system error must not end uploads for good
                log.exception("data upload: the scan failed")
            self._stop.wait(self.settings.scan_interval_s)

    def figures(self) -> dict[str, SpoolFigures]:
        """Per service, as of the last scan (for the telemetry thread)."""
        with self._lock:
            return dict(self._figures)

    # --- one scan ----------------------------------------------------------------------------

    def scan(self) -> None:
        """Enforce every quota, then upload what the hub will take now."""
        quotas = dict(self._quotas())
        self._known_quota.update(quotas)
        spools: dict[str, Listing] = {}
        for folder in self._folders():
            service = folder.name
            quota = self._known_quota.get(service, self.settings.default_quota_bytes)
            listing = self._tidy(folder, service, quota)
            if service in quotas or listing.segments or listing.temps:
                self._empty_since.pop(service, None)
            else:
                # Nothing left of a service no longer assigned: its folder goes, once its last
                # instance had the time to stop (a container's mount of a deleted folder would
                # lose what it writes while it drains).
                since = self._empty_since.setdefault(service, self._clock())
                if self._clock() - since >= self.settings.remove_empty_after_s:
                    shutil.rmtree(folder, ignore_errors=True)
                    self._known_quota.pop(service, None)
                    del self._empty_since[service]
                    continue
            spools[service] = listing
        self._publish(spools)
        if self._clock() >= self._not_before:
            self._upload(spools)
            self._publish({s: list_spool(self.root / s) for s in spools})

    def _folders(self) -> list[Path]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(
            Path(e.path) for e in entries if e.is_dir(follow_symlinks=False) and _NAME.match(e.name)
        )

    def _tidy(self, folder: Path, service: str, quota: int) -> Listing:
        listing = list_spool(folder)
        for stray in listing.strays:
            log.warning("data spool of %s: removing %s, which is no segment", service, stray.name)
            _remove(stray)
        now = time.time()
        for temp, mtime in listing.temps:
            if now - mtime > self.settings.stale_temp_s:
                _remove(temp)
        segments = list(listing.segments)
        total = sum(s.size for s in segments)
        dropped = records = 0
        while segments and (total > quota or len(segments) > self.settings.max_segments):
            oldest = segments.pop(0)
            if _remove(oldest.path):
                dropped += 1
                records += oldest.records
            total -= oldest.size
        if dropped:
            with self._lock:
                self._dropped[service] = self._dropped.get(service, 0) + records
                since = self._dropped[service]
            # Once a minute at most: offline, every scan drops a little.
            now = self._clock()
            if now - self._warned_at.get(service, float("-inf")) >= WARN_EVERY_S:
                self._warned_at[service] = now
                log.warning(
                    "data spool of %s is over its quota of %d bytes: dropping the oldest records "
                    "(%d since the agent started); the hub has not been reachable, or the service "
                    "collects faster than the link uploads",
                    service,
                    quota,
                    since,
                )
        return Listing(segments, [], listing.temps)

    def _publish(self, spools: Mapping[str, Listing]) -> None:
        with self._lock:
            self._figures = {
                service: SpoolFigures(listing.bytes, self._dropped.get(service, 0))
                for service, listing in spools.items()
            }

    def _upload(self, spools: Mapping[str, Listing]) -> None:
        queues = {service: list(listing.segments) for service, listing in spools.items() if listing.segments}
        sent = 0
        while queues and sent < self.settings.max_batches_per_scan and not self._stop.is_set():
            for service in list(queues):
                segment = queues[service].pop(0)
                if not queues[service]:
                    del queues[service]
                if not self._upload_one(service, segment):
                    return  # the hub is not taking batches now: back off
                sent += 1

    def _upload_one(self, service: str, segment: Segment) -> bool:
        """Send one segment; False when the hub cannot take it now (backing off)."""
        try:
            digest, key, data = read_batch(segment, service)
        except FileNotFoundError:
            return True  # dropped over the quota meanwhile
        except Damaged as why:
            self.damaged += 1
            log.warning("data spool of %s: removing %s unsent: %s", service, segment.name, why)
            _remove(segment.path)
            return True
        try:
            self._send(digest, key, data, segment.records)
        except HubRefused as exc:
            self.refused += 1
            log.error(
                "the hub refused batch %s of %s (%d records) for good, so it is dropped: %s",
                digest,
                service,
                segment.records,
                exc,
            )
            _remove(segment.path)
            return True
        except FetchError as exc:
            delay = full_jitter(
                self._attempt,
                self._rand(),
                base_s=self.settings.backoff_base_s,
                cap_s=self.settings.backoff_cap_s,
            )
            if exc.retry_after_s is not None:
                delay = max(delay, min(exc.retry_after_s, self.settings.max_retry_after_s))
            self._attempt += 1
            self._not_before = self._clock() + delay
            log.info("data upload waits %.1fs: %s", delay, exc)
            return False
        self._attempt = 0
        self.uploaded += 1
        _remove(segment.path)
        return True


def _remove(path: Path) -> bool:
    """Remove a file, link or folder; False when it was gone already."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    return True
