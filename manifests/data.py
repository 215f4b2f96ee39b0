"""Production data a module collects on a device (Azure's ``ModelDataCollector``), on its way
from the device's spool to the hub's store.

The contract between the agent (writer and uploader) and the hub (receiver and store):

- A **record** is one ``collect()`` call that was sampled: :class:`CollectedRecord`, one JSON
  object per line.
- A **batch** is records that share service, model, model version, designation and UTC day
  (:class:`BatchKey`), as gzip-compressed JSON lines. Its id is the sha256 digest of the
  compressed bytes, so sending a batch again (after a timeout, a restart of the agent or the
  hub) stores it once: the upload is idempotent by id and the hub can check what it got.
- The device sends it with ``PUT`` :data:`UPLOAD_PATH` ``/{digest}``, the key in the query
  (:meth:`BatchKey.query`), ``Content-Encoding: gzip``, ``Content-Type: application/x-ndjson``
  and ``X-Edgepack-Records``: the number of lines. Answers: 201 stored, 200 stored before
  (the same id), 429/503 with ``Retry-After`` (later), 5xx later; 401 (the device's token, not
  the batch) and 404/405 (a hub older than this route: devices are upgraded first) later too;
  any other 4xx refused for good (the agent drops the batch, counts and logs it; sending it
  again cannot succeed).
- The hub stores the bytes as sent under :func:`blob_key`, a layout like Azure's
  (``service/model/version/designation/YYYY/MM/DD/``), one object per batch.

Every size is bounded below; the hub checks all of them before it keeps anything.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from manifests.bounds import Count
from manifests.digests import DIGEST_PATTERN
from manifests.module import NAME_PATTERN, VERSION_PATTERN

UPLOAD_PATH = "/api/v1/device/data"
CONTENT_TYPE = "application/x-ndjson"
RECORDS_HEADER = "X-Edgepack-Records"

#: Azure's designations are ``inputs`` and ``predictions``; any short lower-case name works.
DESIGNATION_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
#: A model name as ``ModelDataCollector`` takes it: Azure's model names, bounded.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"
#: The request id a client sent (``x-ms-request-id``, ``x-request-id``) or one the server made.
CORRELATION_ID_PATTERN = r"^[\x21-\x7e]{1,128}$"
#: One collected item as JSON: a larger one is dropped (and counted) by the collector.
MAX_RECORD_BYTES = 1 << 20
#: A batch as sent (compressed) and as the hub reads it (decompressed): the hub stops reading
#: at these, so a compression bomb costs it no more than this.
MAX_BATCH_BYTES = 8 << 20
MAX_BATCH_RAW_BYTES = 64 << 20
MAX_BATCH_RECORDS = 100_000
MAX_FEATURE_NAMES = 4096


def _utc(value: datetime) -> datetime:
    offset = value.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise ValueError("must be a UTC time (ending in Z or +00:00)")
    return value


UtcTime = Annotated[datetime, AfterValidator(_utc)]


class BatchKey(BaseModel):
    """What every record of one batch shares; where the batch is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service: str = Field(pattern=NAME_PATTERN)
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    model_version: str = Field(pattern=VERSION_PATTERN)
    designation: str = Field(pattern=DESIGNATION_PATTERN)
    day: date

    def query(self) -> str:
        return urlencode(
            {
                "service": self.service,
                "model": self.model,
                "model_version": self.model_version,
                "designation": self.designation,
                "day": self.day.isoformat(),
            }
        )


class CollectedRecord(BaseModel):
    """One sampled ``collect()`` call, as a line of a batch."""

    model_config = ConfigDict(extra="forbid")

    time: UtcTime
    service: str = Field(pattern=NAME_PATTERN)
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    model_version: str = Field(pattern=VERSION_PATTERN)
    designation: str = Field(pattern=DESIGNATION_PATTERN)
    correlation_id: str | None = Field(default=None, pattern=CORRELATION_ID_PATTERN)
    feature_names: list[Annotated[str, Field(max_length=256)]] | None = Field(
        default=None, max_length=MAX_FEATURE_NAMES
    )
    data: Any = None

    def key(self) -> BatchKey:
        return BatchKey(
            service=self.service,
            model=self.model,
            model_version=self.model_version,
            designation=self.designation,
            day=self.time.date(),
        )


class StoredBatch(BaseModel):
    """A batch as the hub lists it (``GET /api/v1/services/{service}/data``)."""

    model_config = ConfigDict(extra="forbid")

    digest: str = Field(pattern=DIGEST_PATTERN)
    device_id: str
    key: BatchKey
    records: Count
    bytes: Count
    received_at: datetime
    #: the time of the batch's first and last record (what ``since``/``until`` filter on)
    first_at: datetime | None = None
    last_at: datetime | None = None
    path: str = Field(description="the batch's place in the store: blob_key()")


def blob_key(key: BatchKey, device_id: str, digest: str) -> str:
    """``service/model/version/designation/YYYY/MM/DD/DEVICE-HEX.jsonl.gz``: Azure's layout
    (``…/{model}/{version}/{designation}/{yyyy}/{mm}/{dd}/``) under the service, one object per
    batch, named by its device and id so that batches never overwrite each other."""
    hex_ = digest.removeprefix("sha256:")
    d = key.day
    return (
        f"{key.service}/{key.model}/{key.model_version}/{key.designation}/"
        f"{d.year:04d}/{d.month:02d}/{d.day:02d}/{device_id}-{hex_}.jsonl.gz"
    )
