"""Checking a batch of collected data, as the bytes a device sent. Pure but for reading the
file it is given.

The batch is read as a stream: it is decompressed a line at a time, each line at most
:data:`MAX_LINE_BYTES`, all of them together at most ``MAX_BATCH_RAW_BYTES``, so a
compression bomb costs the hub no more memory than one line and no more time than the bound.
Every line must be a :class:`~manifests.data.CollectedRecord` of the batch's key, and there
must be exactly as many as the device declared.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import IO

from pydantic import ValidationError

from cloud_hub.errors import InvalidBatch, TooLarge
from manifests.data import MAX_BATCH_RAW_BYTES, MAX_RECORD_BYTES, BatchKey, CollectedRecord

#: One line: the item (MAX_RECORD_BYTES) plus its feature names and the record's own fields.
MAX_LINE_BYTES = 3 * MAX_RECORD_BYTES


@dataclass(frozen=True)
class BatchSummary:
    records: int
    raw_bytes: int
    first_at: datetime
    last_at: datetime


def _key_text(key: BatchKey) -> str:
    return f"{key.service}/{key.model}/{key.model_version}/{key.designation}/{key.day.isoformat()}"


def _why(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "record"
    return f"{where}: {first.get('msg', 'invalid')}"[:300]


def check_batch(
    fh: IO[bytes],
    key: BatchKey,
    declared: int,
    *,
    max_raw: int = MAX_BATCH_RAW_BYTES,
    max_line: int = MAX_LINE_BYTES,
) -> BatchSummary:
    """Read the gzip stream ``fh`` and return what it holds; raise :class:`InvalidBatch` (or
    :class:`TooLarge` past ``max_raw`` decompressed) at the first thing wrong."""
    count = raw = 0
    first: datetime | None = None
    last: datetime | None = None
    try:
        with gzip.GzipFile(fileobj=fh, mode="rb") as stream:
            while line := stream.readline(max_line + 1):
                raw += len(line)
                if raw > max_raw:
                    raise TooLarge(f"the batch decompresses to more than {max_raw} bytes; nothing was stored")
                count += 1
                if len(line) > max_line:
                    raise InvalidBatch(f"line {count} is longer than {max_line} bytes")
                if count > declared:
                    raise InvalidBatch(f"the batch has more than the {declared} records its header declares")
                try:
                    record = CollectedRecord.model_validate_json(line)
                except ValidationError as exc:
                    raise InvalidBatch(f"line {count} is not a collected record: {_why(exc)}") from None
                if record.key() != key:
                    raise InvalidBatch(
                        f"line {count} is a record of {_key_text(record.key())}, "
                        f"but the batch is for {_key_text(key)}"
                    )
                first = record.time if first is None else min(first, record.time)
                last = record.time if last is None else max(last, record.time)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InvalidBatch(f"the batch is not a whole gzip stream ({exc or type(exc).__name__})") from None
    if count != declared or first is None or last is None:
        raise InvalidBatch(f"the batch has {count} records; its header declares {declared}")
    return BatchSummary(records=count, raw_bytes=raw, first_at=first, last_at=last)
