"""Small filesystem primitives the packager relies on."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import IO, Any

from manifests.durable import durable_output
from manifests.errors import ConfigError


def atomic_output(path: Path, *, mode: int = 0o644) -> contextlib.AbstractContextManager[IO[bytes]]:
    """``manifests.durable.durable_output`` for what the CLI writes where a user said: the
    folder is made when missing, and the default mode is 0644 (bundles, public keys, configs;
    secrets pass 0o600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return durable_output(path, mode=mode)


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
