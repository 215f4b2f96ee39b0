"""Production data collection inside a module: what Azure's ``ModelDataCollector`` (v1) and
``Collector`` (v2) calls become in edgepack (the shims are :mod:`edge_agent.scoring.azureml_shim`).

``collect()`` runs inside ``run()``, on the request's path, so it does as little as it can: it
decides the sample (once per request: inputs and predictions of one request are kept or
dropped together), turns the data into one JSON line and hands it to a bounded in-memory
queue. A background thread (:class:`SpoolWriter`) gathers the lines into one segment per
batch key and writes each closed segment, gzip-compressed, into the service's spool
(:mod:`edge_agent.data.spool`), which the agent uploads. Nothing here raises into ``run()``:
data that cannot become JSON, a record over :data:`manifests.data.MAX_RECORD_BYTES`, a full
queue or a full spool drop the record and count it (``Collection.dropped``), with a warning in
the module's log at most once a minute.

Collection is on when the agent set ``EDGEPACK_DATA_DIR`` (the service's deployment has
``dataCollection``); otherwise every ``collect()`` does nothing, as on Azure.
"""

from __future__ import annotations

import atexit
import contextvars
import gzip
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson

from edge_agent.data.spool import (
    BACKLOG_MAX_AGE_S,
    BACKLOG_SEGMENTS,
    ENV_DIR,
    ENV_QUOTA_BYTES,
    ENV_SAMPLE_RATE,
    ENV_SERVICE,
    SEGMENT_MAX_AGE_S,
    SEGMENT_MAX_RAW_BYTES,
    SEGMENT_MAX_RECORDS,
    list_spool,
    segment_name,
)
from manifests.data import (
    CORRELATION_ID_PATTERN,
    DESIGNATION_PATTERN,
    MAX_FEATURE_NAMES,
    MAX_RECORD_BYTES,
    MODEL_NAME_PATTERN,
)
from manifests.desired import DEFAULT_DATA_SPOOL_MB
from manifests.durable import durable_output
from manifests.module import VERSION_PATTERN

log = logging.getLogger("edge_agent.scoring.collector")

#: Records waiting for the writer thread: beyond either bound, collect() drops (and counts).
MAX_QUEUED_RECORDS = 20_000
MAX_QUEUED_BYTES = 32 << 20
#: How often the writer thread looks at the queue (seconds); it is woken early when the queue
#: is half full.
WRITER_TICK_S = 0.2
#: Batch keys with an open segment at once (a new one closes the oldest first): with
#: SEGMENT_MAX_RAW_BYTES, the most the open segments hold in memory is 16 MiB.
MAX_OPEN_SEGMENTS = 16
#: The writer's own cap on the spool while the agent (which drops the oldest) is away: past
#: this share of the quota it drops what it would write, and counts it.
HARD_CAP_FACTOR = 1.25
#: Seconds the shutdown waits for the writer to write what is in memory.
FLUSH_TIMEOUT_S = 10.0
WARN_EVERY_S = 60.0
#: zlib level of a segment: 3 compresses JSON lines of numbers about 5.6 times, 17 % larger
#: than level 6 at a third of its CPU time (the device's CPU is what the model needs).
GZIP_LEVEL = 1

_CORRELATION = re.compile(CORRELATION_ID_PATTERN.encode())
_CORRELATION_TEXT = re.compile(CORRELATION_ID_PATTERN)
_DESIGNATION = re.compile(DESIGNATION_PATTERN)
_MODEL = re.compile(MODEL_NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_REQUEST_ID_HEADERS = (b"x-ms-request-id", b"x-request-id")
_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class RequestContext:
    """One request as the collector sees it: its correlation id, and whether it is sampled
    (decided at its first collect())."""

    __slots__ = ("correlation_id", "sampled")

    def __init__(self, correlation_id: str | None, sampled: bool | None = None) -> None:
        self.correlation_id = correlation_id
        self.sampled = sampled


#: The request being scored. Set by the scoring app around run(); a context variable, so it
#: follows run() into asyncio tasks and into threads started with a copied context
#: (``asyncio.to_thread``, ``contextvars.copy_context().run``).
CURRENT_REQUEST: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "edgepack_request", default=None
)


def request_correlation_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's ``x-ms-request-id`` (or ``x-request-id``) when it is a valid id (printable
    ASCII, 1-128 characters, as Azure's server takes it), else a new uuid4."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in _REQUEST_ID_HEADERS:
            found[name] = value
    for name in _REQUEST_ID_HEADERS:
        given = found.get(name)
        if given is not None and _CORRELATION.fullmatch(given):
            return given.decode("ascii")
    return str(uuid.uuid4())


def valid_correlation_id(value: object) -> str | None:
    return value if isinstance(value, str) and _CORRELATION_TEXT.fullmatch(value) else None


def _json_default(value: Any) -> Any:
    # pandas: a DataFrame as its rows (Azure's v2 collector stores rows), a Series or an index
    # as a list; anything else that says how to become a list (torch, array-likes).
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and hasattr(value, "columns"):
        return to_dict(orient="records")
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass(frozen=True)
class CollectionSettings:
    """Where and how much one scoring process collects (from the agent's variables)."""

    folder: Path
    service: str
    sample_rate: float = 1.0
    quota_bytes: int = DEFAULT_DATA_SPOOL_MB << 20
    max_queued_records: int = MAX_QUEUED_RECORDS
    max_queued_bytes: int = MAX_QUEUED_BYTES
    segment_max_raw_bytes: int = SEGMENT_MAX_RAW_BYTES
    segment_max_records: int = SEGMENT_MAX_RECORDS
    segment_max_age_s: float = SEGMENT_MAX_AGE_S
    backlog_max_age_s: float = BACKLOG_MAX_AGE_S

    @classmethod
    def from_env(cls, env: Mapping[str, str], default_service: str) -> CollectionSettings | None:
        """None when collection is off (no ``EDGEPACK_DATA_DIR``); raises ValueError for a
        variable that does not parse."""
        folder = env.get(ENV_DIR)
        if not folder:
            return None
        rate = float(env.get(ENV_SAMPLE_RATE, "1"))
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"{ENV_SAMPLE_RATE}={rate} is not in (0, 1]")
        quota = int(env.get(ENV_QUOTA_BYTES, str(DEFAULT_DATA_SPOOL_MB << 20)))
        if quota < 1:
            raise ValueError(f"{ENV_QUOTA_BYTES}={quota} must be positive")
        return cls(Path(folder), env.get(ENV_SERVICE) or default_service, rate, quota)


@dataclass
class DropCounts:
    """Records dropped in this process, by cause."""

    by_cause: Counter[str] = field(default_factory=Counter)

    def total(self) -> int:
        return sum(self.by_cause.values())


_Key = tuple[str, str, str, date]  # model, model version, designation, UTC day


class Collection:
    """The collector of one scoring process: sampling, serialisation, the queue, the writer."""

    def __init__(
        self,
        settings: CollectionSettings,
        *,
        module_name: str,
        module_version: str,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.module_name = module_name
        self.module_version = module_version
        self._rand = rand
        self._lock = threading.Lock()
        self._queue: deque[tuple[_Key, bytes]] = deque()
        self._queued_bytes = 0
        self.kept = 0
        self.dropped = DropCounts()
        self._warned_at = float("-inf")
        self._heads: dict[tuple[str, str, str, tuple[str, ...] | None], bytes] = {}
        # (second, its text, its UTC day), replaced whole: a collect() reads it once, so that
        # its record's time and the day it is batched under never come from two different
        # seconds (another thread's call may move it on meanwhile; at midnight the hub would
        # refuse the whole batch for that one record).
        self._stamp: tuple[int, bytes, date] = (-1, b"", date(1970, 1, 1))
        self.writer = SpoolWriter(self, clock)

    # --- the request's path -----------------------------------------------------------------

    def sampled(self, context: RequestContext | None) -> bool:
        if self.settings.sample_rate >= 1.0:
            return True
        if context is None:
            return self._rand() < self.settings.sample_rate
        if context.sampled is None:
            context.sampled = self._rand() < self.settings.sample_rate
        return context.sampled

    def collect(
        self,
        data: Any,
        *,
        model: str,
        model_version: str,
        designation: str,
        correlation_id: str | None,
        feature_names: list[str] | None = None,
    ) -> None:
        """Queue one sampled record; never raises, never waits for the disk."""
        # This runs inside run(): the parts of the line that do not change (service, model,
        # version, designation, feature names) are JSON once per collector, and the time's
        # text once per second; only the correlation id and the data are serialised per call.
        names = tuple(feature_names) if feature_names is not None else None
        shape = (model, model_version, designation, names)
        head = self._heads.get(shape)
        if head is None:
            head = self._head(shape)
        now = time.time()
        second = int(now)
        stamp = self._stamp
        if second != stamp[0]:
            stamp = self._set_second(second)
        _, second_text, day = stamp
        try:
            line = b"".join((
                b'{"time":"', second_text, b".%06d+00:00" % ((now - second) * 1e6),
                b'","correlation_id":', orjson.dumps(correlation_id), head,
                orjson.dumps(data, default=_json_default, option=_DUMP_OPTIONS), b"}\n",
            ))  # fmt: skip
        except (TypeError, orjson.JSONEncodeError) as exc:
            self.drop("unserialisable", f"{designation}: the data is not JSON ({exc})")
            return
        if len(line) > MAX_RECORD_BYTES:
            self.drop("too-large", f"{designation}: a record of {len(line)} bytes is over {MAX_RECORD_BYTES}")
            return
        settings = self.settings
        queue = self._queue
        with self._lock:
            full = len(queue) >= settings.max_queued_records or (
                self._queued_bytes + len(line) > settings.max_queued_bytes
            )
            if not full:
                queue.append(((model, model_version, designation, day), line))
                self._queued_bytes += len(line)
                self.kept += 1
            half = len(queue) * 2 >= settings.max_queued_records
        if full:
            self.drop("queue-full", "the writer falls behind: the queue of records is full")
            return
        self.writer.ensure_started()
        if half:
            self.writer.wake()

    def _head(self, shape: tuple[str, str, str, tuple[str, ...] | None]) -> bytes:
        model, model_version, designation, names = shape
        fields: dict[str, Any] = {
            "service": self.settings.service,
            "model": model,
            "model_version": model_version,
            "designation": designation,
        }
        if names is not None:
            fields["feature_names"] = list(names)
        # ',"service":...,"designation":...,"data":' : the object's middle, braces cut off.
        head = b"," + orjson.dumps(fields)[1:-1] + b',"data":'
        if len(self._heads) < MAX_OPEN_SEGMENTS * 4:
            self._heads[shape] = head
        return head

    def _set_second(self, second: int) -> tuple[int, bytes, date]:
        moment = datetime.fromtimestamp(second, UTC)
        stamp = (second, moment.strftime("%Y-%m-%dT%H:%M:%S").encode(), moment.date())
        self._stamp = stamp
        return stamp

    def drop(self, cause: str, why: str, count: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            self.dropped.by_cause[cause] += count
            warn = now - self._warned_at >= WARN_EVERY_S
            if warn:
                self._warned_at = now
        if warn:
            log.warning(
                "data collection dropped records: %s (dropped so far: %s)",
                why,
                ", ".join(f"{n} {c}" for c, n in sorted(self.dropped.by_cause.items())),
            )

    def take_queued(self) -> list[tuple[_Key, bytes]]:
        with self._lock:
            taken = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
        return taken

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Write what is in memory (queue and open segments) and stop the writer."""
        self.writer.stop(timeout_s)


class _OpenSegment:
    __slots__ = ("lines", "opened", "raw_bytes")

    def __init__(self, opened: float) -> None:
        self.lines: list[bytes] = []
        self.raw_bytes = 0
        self.opened = opened


class SpoolWriter:
    """The background thread that turns queued lines into closed segments on disk."""

    def __init__(self, collection: Collection, clock: Callable[[], float] = time.monotonic) -> None:
        self._collection = collection
        self._settings = collection.settings
        self._clock = clock
        self._open: dict[_Key, _OpenSegment] = {}
        self._backlog = False
        # What the spool holds, listed at most once per segment age and counted up in between
        # (only the agent removes: an upper bound), so a large spool is not listed per segment.
        self._held = 0
        self._held_checked = float("-inf")
        self._backlog_checked = float("-inf")
        self._sequence = 0
        self._wake = threading.Event()
        self._drain_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.written = 0  # segments

    def ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None and not self._stopping.is_set():
                thread = threading.Thread(target=self._run, name="edgepack-collector", daemon=True)
                thread.start()
                self._thread = thread

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float) -> None:
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        else:
            self.drain(final=True)

    def _run(self) -> None:
        while True:
            self._wake.wait(WRITER_TICK_S)
            self._wake.clear()
            final = self._stopping.is_set()
            try:
                self.drain(final=final)
            except Exception:  # a disk error must not end collection for good
                log.exception("data collection: writing the spool failed")
            if final:
                return

    def drain(self, *, final: bool = False) -> None:
        """One pass of the thread: queued records into their segments, and every segment that
        is full or old enough (all of them when ``final``) written to the spool."""
        with self._drain_lock:
            self._drain(final=final)

    def _drain(self, *, final: bool) -> None:
        settings = self._settings
        now = self._clock()
        for key, line in self._collection.take_queued():
            segment = self._open.get(key)
            if segment is None:
                if len(self._open) >= MAX_OPEN_SEGMENTS:
                    oldest = min(self._open, key=lambda k: self._open[k].opened)
                    self._close(oldest)
                segment = self._open[key] = _OpenSegment(now)
            segment.lines.append(line)
            segment.raw_bytes += len(line)
            if (
                segment.raw_bytes >= settings.segment_max_raw_bytes
                or len(segment.lines) >= settings.segment_max_records
            ):
                self._close(key)
        age_limit = settings.segment_max_age_s
        if (
            not final
            and any(now - s.opened >= age_limit for s in self._open.values())
            and self._backlogged(now)
        ):
            # Segments wait already (the hub is out of reach): small ones would only fill the
            # spool with files, so records gather for longer.
            age_limit = settings.backlog_max_age_s
        for key in list(self._open):
            if final or now - self._open[key].opened >= age_limit:
                self._close(key)

    def _spool_bytes(self) -> int:
        now = self._clock()
        if now - self._held_checked >= self._settings.segment_max_age_s:
            self._held_checked = now
            self._held = list_spool(self._settings.folder).bytes
        return self._held

    def _backlogged(self, now: float) -> bool:
        """Whether closed segments wait for the uploader (looked at once per segment age)."""
        if now - self._backlog_checked >= self._settings.segment_max_age_s:
            self._backlog_checked = now
            try:
                with os.scandir(self._settings.folder) as entries:
                    waiting = sum(1 for e in entries if not e.name.startswith("."))
            except OSError:
                waiting = 0
            self._backlog = waiting >= BACKLOG_SEGMENTS
        return self._backlog

    def _close(self, key: _Key) -> None:
        segment = self._open.pop(key)
        records = len(segment.lines)
        if not records:
            return
        data = gzip.compress(b"".join(segment.lines), compresslevel=GZIP_LEVEL, mtime=0)
        settings = self._settings
        held = self._spool_bytes()
        if held + len(data) > settings.quota_bytes * HARD_CAP_FACTOR:
            # The agent drops the oldest to keep the spool within its quota; while it is away,
            # the newest go rather than the device's disk filling.
            self._collection.drop(
                "spool-full",
                f"the spool holds {held} bytes, over its quota of {settings.quota_bytes}",
                records,
            )
            self._held_checked = float("-inf")  # the agent may have made room since: look again
            return
        self._sequence += 1
        name = segment_name(time.time_ns(), os.getpid(), self._sequence, records)
        try:
            settings.folder.mkdir(parents=True, exist_ok=True)
            with durable_output(settings.folder / name, mode=0o600) as fh:
                fh.write(data)
        except OSError as exc:
            self._collection.drop("write-failed", f"cannot write {settings.folder / name}: {exc}", records)
            return
        self.written += 1
        self._held += len(data)


# --- the process's collection -----------------------------------------------------------------

_module: tuple[str, str] = ("module", "0")
_state_lock = threading.Lock()
_collection: Collection | None = None
_configured = False


def set_module(name: str, version: str) -> None:
    """The module being served (the scoring server calls this before it imports the entry
    script): a collector's default model name and version."""
    global _module
    _module = (name, version)


def module_identity() -> tuple[str, str]:
    return _module


def active() -> Collection | None:
    """This process's collection, None when collection is off (made at the first call)."""
    global _collection, _configured
    if _configured:
        return _collection
    with _state_lock:
        if not _configured:
            try:
                settings = CollectionSettings.from_env(os.environ, _module[0])
            except ValueError as exc:
                log.error("data collection is off: %s", exc)
                settings = None
            if settings is not None:
                _collection = Collection(settings, module_name=_module[0], module_version=_module[1])
            _configured = True
    return _collection


def shutdown() -> None:
    """Write what the collector holds in memory (the server is stopping)."""
    collection = _collection
    if collection is not None:
        collection.close()


def _forget_after_fork() -> None:
    # A forked worker starts its own queue, writer thread and lock: the parent's thread does
    # not exist in the child.
    global _collection, _configured, _state_lock
    _collection = None
    _configured = False
    _state_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(shutdown)


def check_names(model: str, version: str, designation: str, feature_names: list[str] | None) -> str | None:
    """Why a collector with these names cannot collect (None when it can)."""
    if not _MODEL.fullmatch(model):
        return f"model name {model!r} does not match {MODEL_NAME_PATTERN}"
    if not _VERSION.fullmatch(version):
        return f"model version {version!r} does not match {VERSION_PATTERN}"
    if not _DESIGNATION.fullmatch(designation):
        return f"designation {designation!r} does not match {DESIGNATION_PATTERN}"
    if feature_names is not None and (
        len(feature_names) > MAX_FEATURE_NAMES
        or not all(isinstance(n, str) and len(n) <= 256 for n in feature_names)
    ):
        return f"feature_names must be at most {MAX_FEATURE_NAMES} strings of at most 256 characters"
    return None
