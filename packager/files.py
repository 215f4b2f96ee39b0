"""Small filesystem primitives the packager relies on."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from manifests.errors import ConfigError


@contextlib.contextmanager
def atomic_output(path: Path, *, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Write ``path`` all at once: a temp file beside it, fsync, rename.

    On any error the temp file is removed, so nothing half-written is ever left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_json_file(path: Path, *, what: str = "") -> Any:
    """Parse a JSON file; errors name the file (and line/column for syntax errors)."""
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: {what or 'file'} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{label}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"
        ) from None
