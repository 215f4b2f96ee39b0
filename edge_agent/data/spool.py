"""The layout of a service's data spool, ``<state_dir>/data/<service>/``: what the scoring
server's collector writes and the agent's uploader reads, deletes and counts.

A **segment** is a closed batch: gzip-compressed JSON lines (:class:`manifests.data.CollectedRecord`)
that all share one :class:`manifests.data.BatchKey`, written whole and renamed into place by
``manifests.durable`` (a reader never sees half of one; the temp files are hidden names). Its
name says when it was closed, by which process, and how many records it holds, so that the
agent can put the spool in order and count what it drops without opening a file::

    00001765130000123456789-4711-000012-250.jsonl.gz
    closed (ns since the epoch) - pid - sequence in that process - records

The folder is shared with the module's own code (the docker runtime mounts it read-write into
the container), so the agent trusts nothing in it: names that do not parse, links and files
over the bounds are removed, and the hub checks every batch again.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

#: The scoring server's variables (set by the agent's runtimes when the service collects).
ENV_DIR = "EDGEPACK_DATA_DIR"
ENV_SAMPLE_RATE = "EDGEPACK_DATA_SAMPLE_RATE"
ENV_QUOTA_BYTES = "EDGEPACK_DATA_QUOTA_BYTES"
ENV_SERVICE = "EDGEPACK_SERVICE"
#: The spool of every service, under the agent's state folder.
DATA_DIR = "data"
SUFFIX = ".jsonl.gz"

#: A segment is closed when its records reach this many bytes (uncompressed JSON lines) ...
SEGMENT_MAX_RAW_BYTES = 1 << 20
#: ... or this many records (well below manifests.data.MAX_BATCH_RECORDS) ...
SEGMENT_MAX_RECORDS = 10_000
#: ... or when its first record is this old (seconds): the delay before the hub can have it.
SEGMENT_MAX_AGE_S = 10.0
#: While this many segments wait already (the hub is out of reach), a segment is closed by age
#: only after BACKLOG_MAX_AGE_S: a day offline is 288 files per batch key, not 8,640.
BACKLOG_SEGMENTS = 16
BACKLOG_MAX_AGE_S = 300.0
#: The most segments a service's spool holds; beyond, the oldest go as if over the quota.
MAX_SEGMENTS = 20_000

_NAME = re.compile(r"^(\d{20})-(\d{1,10})-(\d{6,12})-(\d{1,9})\.jsonl\.gz$")


@dataclass(frozen=True, order=True)
class Segment:
    """A closed segment in a spool (ordered oldest first)."""

    closed_ns: int
    pid: int
    sequence: int
    records: int
    size: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


def segment_name(closed_ns: int, pid: int, sequence: int, records: int) -> str:
    return f"{closed_ns:020d}-{pid}-{sequence:06d}-{records}{SUFFIX}"


def parse_name(name: str) -> tuple[int, int, int, int] | None:
    """``(closed_ns, pid, sequence, records)`` of a segment's file name, None for any other."""
    match = _NAME.match(name)
    if match is None:
        return None
    closed, pid, sequence, records = (int(g) for g in match.groups())
    return closed, pid, sequence, records


@dataclass(frozen=True)
class Listing:
    """What a spool folder holds: its closed segments oldest first, and what is not one."""

    segments: list[Segment]
    strays: list[Path]  # names that are no segment, links, folders: never uploaded
    temps: list[tuple[Path, float]]  # a writer's hidden temp files, with their mtime

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self.segments)


def list_spool(folder: Path) -> Listing:
    """The spool in ``folder`` (an empty listing when it does not exist). Looks at names and
    ``lstat`` only: a link is never followed."""
    segments: list[Segment] = []
    strays: list[Path] = []
    temps: list[tuple[Path, float]] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return Listing([], [], [])
    for entry in entries:
        path = Path(entry.path)
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted meanwhile (uploaded, or dropped by the writer's own cap)
        if entry.name.startswith("."):
            if entry.name.endswith(".tmp") and stat.S_ISREG(info.st_mode):
                temps.append((path, info.st_mtime))
            else:
                strays.append(path)
            continue
        parsed = parse_name(entry.name)
        if parsed is None or not stat.S_ISREG(info.st_mode):
            strays.append(path)
            continue
        segments.append(Segment(*parsed, size=info.st_size, path=path))
    segments.sort()
    return Listing(segments, strays, temps)


def spool_dir(state_dir: Path, service: str) -> Path:
    """Where ``service``'s records wait on this device."""
    return state_dir / DATA_DIR / service
