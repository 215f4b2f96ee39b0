"""Collected production data of a service, read from the hub (Azure ML keeps it in blob
storage under ``…/{model}/{version}/{designation}/{yyyy}/{mm}/{dd}/``; the hub keeps the same
layout under the service, see docs/data-collection.md).

:func:`list_batches` pages through what the hub holds; :func:`download` writes each batch as
JSON lines under the same layout (``.jsonl``), every batch checked against its digest before
it is unpacked, every file written whole or not at all.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from manifests.data import DESIGNATION_PATTERN, MODEL_NAME_PATTERN, CollectedRecord, StoredBatch, blob_key
from manifests.errors import FetchError, HubUnavailable, TrustError
from manifests.module import check_relative_path
from packager.files import atomic_output
from packager.sdk.errors import BadArgument
from packager.sdk.model import check_name
from packager.sdk.progress import ProgressCallback, ProgressOption, Tracker, reporting
from packager.sdk.targets import check_device_id
from packager.sdk.transport import Transport

if TYPE_CHECKING:
    from packager.sdk.hub import Hub

#: Batches per listing request (the hub's largest page).
PAGE = 1000
_AGO = re.compile(r"^(\d{1,6})([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str | datetime | date, *, now: datetime | None = None, what: str = "since") -> datetime:
    """A point in time as a user gives it: ``1h``/``30m``/``2d`` ago, a day (``2026-12-01``,
    its start, UTC), an ISO time (without a zone: UTC), or a datetime/date."""
    if isinstance(text, datetime):
        return text if text.tzinfo is not None else text.replace(tzinfo=UTC)
    if isinstance(text, date):
        return datetime(text.year, text.month, text.day, tzinfo=UTC)
    value = text.strip()
    match = _AGO.match(value)
    if match:
        amount, unit = int(match.group(1)), _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: amount})
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise BadArgument(
            f"{what} {text[:50]!r}: give a duration ago (30m, 1h, 2d), a day (2026-12-01) or an ISO time"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DataFilter:
    """Which batches (and records) of a service: every field optional."""

    since: datetime | None = None
    until: datetime | None = None
    designation: str | None = None
    model: str | None = None
    device: str | None = None

    @classmethod
    def of(
        cls,
        *,
        since: str | datetime | date | None = None,
        until: str | datetime | date | None = None,
        designation: str | None = None,
        model: str | None = None,
        device: str | None = None,
    ) -> DataFilter:
        now = datetime.now(UTC)
        if designation is not None and not re.fullmatch(DESIGNATION_PATTERN, designation):
            raise BadArgument(f"designation {designation[:50]!r}: a short lower-case name, e.g. inputs")
        if model is not None and not re.fullmatch(MODEL_NAME_PATTERN, model):
            raise BadArgument(f"model {model[:50]!r} is not a model name")
        if device is not None:
            check_device_id(device)
        start = parse_when(since, now=now, what="since") if since is not None else None
        end = parse_when(until, now=now, what="until") if until is not None else None
        if start is not None and end is not None and end <= start:
            raise BadArgument("until must come after since")
        return cls(since=start, until=end, designation=designation, model=model, device=device)

    def params(self) -> dict[str, str]:
        out = {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "designation": self.designation,
            "model": self.model,
            "device": self.device,
        }
        return {k: v for k, v in out.items() if v is not None}

    def keeps(self, at: datetime) -> bool:
        return (self.since is None or at >= self.since) and (self.until is None or at < self.until)


@dataclass
class DataListing:
    """A service's batches, and per device the newest spool figures its telemetry carried."""

    batches: list[StoredBatch] = field(default_factory=list)
    #: device → {"data_spooled_bytes", "data_dropped_total", "at"}
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def dropped(self) -> dict[str, int]:
        """device → records its spool dropped (when full) since its agent started."""
        return {
            d: int(f["data_dropped_total"]) for d, f in self.devices.items() if f.get("data_dropped_total")
        }


def _batch(data: Any) -> StoredBatch:
    try:
        known = {k: v for k, v in data.items() if k in StoredBatch.model_fields}
        return StoredBatch.model_validate(known)
    except (AttributeError, ValidationError) as exc:
        raise HubUnavailable(
            f"the hub listed a data batch this SDK cannot read ({exc}); is it the same version?"
        ) from None


def list_batches(transport: Transport, service: str, where: DataFilter) -> DataListing:
    """Every batch of ``service`` that ``where`` selects, oldest first (all pages)."""
    listing = DataListing()
    after = "0"
    while True:
        answer = transport.get(
            f"/api/v1/services/{service}/data", params={**where.params(), "limit": PAGE, "after": after}
        )
        listing.batches += [_batch(b) for b in answer.get("batches", [])]
        listing.devices.update(answer.get("devices", {}))
        if not answer.get("next"):
            return listing
        after = str(answer["next"])


@dataclass(frozen=True)
class DataDownload:
    """What :func:`download` wrote."""

    batches: int
    records: int
    #: compressed bytes downloaded
    bytes: int
    files: list[Path]
    #: device → records its spool dropped, from its newest telemetry (devices that dropped none are left out)
    dropped: dict[str, int]


def _fetch(transport: Transport, service: str, batch: StoredBatch, tracker: Tracker) -> bytes:
    """The batch's gzip bytes, checked against its digest (at most MAX_BATCH_BYTES)."""
    hasher, buffer = hashlib.sha256(), io.BytesIO()
    path = f"/api/v1/services/{service}/data/{batch.digest}"
    try:
        with transport.stream("GET", path, params={"device": batch.device_id}) as response:
            for chunk in response.iter_bytes(1 << 20):
                hasher.update(chunk)
                buffer.write(chunk)
                tracker.advance(len(chunk))
    except OSError as exc:
        raise FetchError(f"downloading data batch {batch.digest} failed ({exc}); try again") from None
    if "sha256:" + hasher.hexdigest() != batch.digest:
        raise TrustError(
            f"data batch {batch.path}: the bytes downloaded do not match {batch.digest}; try again"
        )
    return buffer.getvalue()


def _kept_lines(raw: bytes, where: DataFilter) -> tuple[list[bytes], int]:
    """The batch's lines whose record time ``where`` keeps (all when it has no time bounds)."""
    lines = [line for line in raw.splitlines() if line.strip()]
    if where.since is None and where.until is None:
        return lines, len(lines)
    try:
        kept = [line for line in lines if where.keeps(CollectedRecord.model_validate_json(line).time)]
    except ValidationError as exc:
        raise TrustError(
            f"a data batch holds a line that is not a collected record ({exc.errors()[0]['msg']})"
        ) from None
    return kept, len(kept)


def _place(batch: StoredBatch) -> str:
    """Where the batch goes under the output folder: the store's layout, rebuilt from the
    batch's checked fields (never a path the hub sent as it is)."""
    try:
        return check_relative_path(blob_key(batch.key, check_device_id(batch.device_id), batch.digest))
    except (ValueError, BadArgument) as exc:
        raise TrustError(f"the hub listed a data batch with an unsafe place ({exc})") from None


def download(
    transport: Transport, service: str, out_dir: Path, where: DataFilter, report: ProgressCallback | None
) -> DataDownload:
    """Write every selected batch of ``service`` under ``out_dir`` as JSON lines."""
    listing = list_batches(transport, service, where)
    tracker = Tracker(report, "downloading data", sum(b.bytes for b in listing.batches))
    files: list[Path] = []
    records = size = 0
    for batch in listing.batches:
        body = _fetch(transport, service, batch, tracker)
        size += len(body)
        try:
            raw = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise TrustError(f"data batch {batch.path} is not gzip ({exc})") from None
        lines, count = _kept_lines(raw, where)
        if not lines:
            continue
        target = out_dir / _place(batch).removesuffix(".gz")
        with atomic_output(target) as out:
            out.write(b"\n".join(lines) + b"\n")
        files.append(target)
        records += count
    return DataDownload(
        batches=len(files), records=records, bytes=size, files=files, dropped=listing.dropped()
    )


def download_service_data(
    workspace: Hub,
    service: str,
    out_dir: str | Path,
    *,
    since: str | datetime | date | None = None,
    until: str | datetime | date | None = None,
    designation: str | None = None,
    model: str | None = None,
    device: str | None = None,
    progress: ProgressOption = None,
) -> DataDownload:
    """:meth:`Service.download_data` by the service's name: the hub keeps a service's data
    after the service is deleted (until its retention), so this needs no live service."""
    check_name(service, "service")
    where = DataFilter.of(since=since, until=until, designation=designation, model=model, device=device)
    with reporting(progress if progress is not None else workspace.progress) as report:
        return download(workspace.transport, service, Path(out_dir), where, report)


def delete_service_data(
    workspace: Hub,
    service: str,
    *,
    device: str | None = None,
    until: str | datetime | date | None = None,
) -> int:
    """Delete a service's collected data on the hub (one device's, or what was received before
    ``until``, when given); the number of batches deleted. Works after the service was deleted."""
    check_name(service, "service")
    params: dict[str, str] = {}
    if device is not None:
        params["device"] = check_device_id(device)
    if until is not None:
        params["until"] = parse_when(until, what="until").isoformat()
    answer = workspace.transport.request("DELETE", f"/api/v1/services/{service}/data", params=params).json()
    return int(answer["deleted"])
