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

:class:`CredentialsFiles` writes one credentials document per device into a folder, each
mode 0600: every file is written under a temporary name first, the data is synced once, and
only then is each renamed into place, so a crash leaves either no file or a whole one, and
thousands of files cost one sync rather than one each. Creating thousands of files is slow on
many disks (0.2-0.5 ms each on a virtual disk), so the empty temporary files are made in the
background while the hub enrols the devices, and filled once it has answered.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from manifests.desired import check_tag, check_tag_count
from manifests.device import DeviceCredentials
from manifests.durable import replace_all_durably
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
    try:
        check_tag_count(len(tags))
    except ConfigError as exc:
        raise BadArgument(f"{where}: {exc}") from None
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


class CredentialsFiles:
    """The credentials files of one bulk enrolment, as a context manager around the request.

    On entering, the first temporary file is created at once (a folder that cannot be written
    fails before the hub enrols anything), the rest in a background thread. :meth:`save` fills
    and renames them; leaving the block without it (the hub refused, the user interrupted)
    removes every temporary file, and the folder too when this made it.
    """

    def __init__(self, out_dir: Path, device_ids: Sequence[str]) -> None:
        self.out_dir = out_dir
        self.device_ids = list(device_ids)
        self._made_dir = False
        self._staged: list[str] = []
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None
        self._saved = False

    def _tmp(self, device_id: str) -> str:
        # A fixed temporary name (ids are unique in one enrolment): mkstemp's random names cost
        # more than the writes.
        return str(self.out_dir / f".{device_id}.json.part")

    def _create(self, device_id: str) -> None:
        tmp = self._tmp(device_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by an interrupted run
        # Never through a link; created 0600, so never readable by others.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        self._staged.append(tmp)

    def _create_rest(self) -> None:
        try:
            for device_id in self.device_ids[1:]:
                self._create(device_id)
        except OSError as exc:
            self._error = exc

    def __enter__(self) -> CredentialsFiles:
        try:
            if not self.out_dir.exists():
                self.out_dir.mkdir(parents=True)
                self._made_dir = True
            if self.device_ids:
                self._create(self.device_ids[0])
        except OSError as exc:
            self._discard()
            raise BadArgument(f"cannot write credentials into {self.out_dir}: {exc.strerror}") from None
        self._thread = threading.Thread(target=self._create_rest, name="credentials-files", daemon=True)
        self._thread.start()
        return self

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def save(self, documents: Sequence[DeviceCredentials]) -> list[Path]:
        """Fill, sync and rename every file into place; the paths, in the order of the ids."""
        self._join()
        if self._error is not None:  # made now, as without the head start (or the error shows)
            staged = set(self._staged)
            for device_id in self.device_ids:
                if self._tmp(device_id) not in staged:
                    self._create(device_id)
        by_id = {d.device_id: d for d in documents}
        if sorted(by_id) != sorted(self.device_ids):
            raise ValueError("the hub's answer does not name the devices that were sent")
        for device_id in self.device_ids:
            # pydantic's encoder: json.dumps with an indent falls back to pure Python
            body = by_id[device_id].model_dump_json(indent=2, by_alias=True, exclude_none=True)
            fd = os.open(self._tmp(device_id), os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
            with os.fdopen(fd, "wb") as fh:
                fh.write(body.encode() + b"\n")
        paths = [credentials_path(self.out_dir, device_id) for device_id in self.device_ids]
        # One sync for every file's data before any of them is renamed into place.
        replace_all_durably([(Path(self._tmp(d)), p) for d, p in zip(self.device_ids, paths, strict=True)])
        self._staged = []
        self._saved = True
        return paths

    def _discard(self) -> None:
        for tmp in self._staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._staged = []
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only when empty: nothing of anyone else's goes

    def __exit__(self, *exc: object) -> None:
        self._join()
        if not self._saved:
            self._discard()
