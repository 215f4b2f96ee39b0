"""A fleet's device list as a CSV file, for bulk enrolment, and the credentials it produces.

The file (``devices.csv``) has a header row naming its columns; ``id`` is required, ``tags``
optional, and no other column is allowed (a misspelt header must not silently drop tags):

```
id,tags
edge-001,site=berlin;tier=gpu
edge-002,site=berlin
```

``tags`` holds ``key=value`` pairs separated by ``;`` (so the cell needs no CSV quoting).
:func:`parse_device_file` checks every row before anything is sent: the first bad one refuses
the whole file with its row number (the header is row 1). Pure: text in, rows out.

:func:`save_credentials_files` writes one credentials document per device into a folder, each
mode 0600: every file is written under a temporary name first, the data is synced once, and
only then is each renamed into place, so a crash leaves either no file or a whole one, and
thousands of files cost one sync rather than one each.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from manifests.desired import check_tag
from manifests.device import DeviceCredentials
from manifests.errors import ConfigError
from packager.sdk.errors import BadArgument
from packager.sdk.targets import check_device_id

COLUMNS = ("id", "tags")


@dataclass(frozen=True)
class DeviceRow:
    """One device of the file: its row number (the header is 1), id and tags."""

    row: int
    device_id: str
    tags: dict[str, str]


def _tags(cell: str, where: str) -> dict[str, str]:
    """``site=berlin;tier=gpu`` as a dict, each key and value as the hub accepts them."""
    tags: dict[str, str] = {}
    for item in (i.strip() for i in cell.split(";")):
        if not item:
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise BadArgument(f"{where}: tag {item!r} is not key=value (e.g. site=berlin)")
        try:
            check_tag(key, value)
        except ConfigError as exc:
            raise BadArgument(f"{where}: tag {exc}") from None
        if tags.get(key, value) != value:
            raise BadArgument(f"{where}: tag key {key!r} is given twice")
        tags[key] = value
    return tags


def parse_device_file(text: str, *, name: str = "devices.csv") -> list[DeviceRow]:
    """The rows of a device file, every one checked; :class:`BadArgument` names the first bad row."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise BadArgument(f"{name} is empty; the first row names the columns: id,tags") from None
    columns = [c.strip().lower() for c in header]
    unknown = [c for c in columns if c not in COLUMNS]
    if "id" not in columns or unknown or len(set(columns)) != len(columns):
        raise BadArgument(
            f"{name} row 1: the header must name the columns 'id' and optionally 'tags' "
            f"(got {','.join(header)!r})"
        )
    rows: list[DeviceRow] = []
    seen: dict[str, int] = {}
    for number, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue  # blank lines carry no device
        where = f"{name} row {number}"
        if len(fields) != len(columns):
            raise BadArgument(
                f"{where}: {len(fields)} fields, the header has {len(columns)} "
                "(separate tags with ';', not ',')"
            )
        cells = dict(zip(columns, (f.strip() for f in fields), strict=True))
        try:
            device_id = check_device_id(cells["id"])
        except BadArgument as exc:
            raise BadArgument(f"{where}: {exc}") from None
        if device_id in seen:
            raise BadArgument(
                f"{where}: device {device_id!r} is listed twice (first on row {seen[device_id]})"
            )
        seen[device_id] = number
        rows.append(DeviceRow(number, device_id, _tags(cells.get("tags", ""), where)))
    if not rows:
        raise BadArgument(f"{name} lists no devices")
    return rows


def credentials_path(out_dir: Path, device_id: str) -> Path:
    return out_dir / f"{device_id}.json"


def check_out_dir(out_dir: Path, rows: Sequence[DeviceRow], *, name: str = "devices.csv") -> None:
    """Refuse (before enrolling anything) when a device's credentials file already exists."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BadArgument(f"{out_dir} is not a folder")
    for row in rows:
        path = credentials_path(out_dir, row.device_id)
        if path.exists():
            raise BadArgument(
                f"{name} row {row.row}: {path} already exists; move it away or pick another folder"
            )


def save_credentials_files(documents: Sequence[DeviceCredentials], out_dir: Path) -> list[Path]:
    """Write ``<id>.json`` (mode 0600) for every document into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        for document in documents:
            # A fixed temporary name (ids are unique in one enrolment): mkstemp's random names
            # cost more than the writes. Never through a link; created 0600, so never readable.
            tmp = str(out_dir / f".{document.device_id}.json.part")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # left by an interrupted run
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            staged.append((tmp, credentials_path(out_dir, document.device_id)))
            # pydantic's encoder: json.dumps with an indent falls back to pure Python
            body = document.model_dump_json(indent=2, by_alias=True, exclude_none=True)
            with os.fdopen(fd, "wb") as fh:
                fh.write(body.encode() + b"\n")
        os.sync()  # one sync for every file's data, before any of them is renamed into place
        for tmp, path in staged:
            os.replace(tmp, path)
        staged = []
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return [credentials_path(out_dir, d.device_id) for d in documents]
