"""The log of each service's last failed instance, kept on the device (``edgepack service logs
SERVICE --device ID --failed``).

An instance that failed to start is stopped and, after a rollback, the version that serves is
another one: without this copy its output could not be reached any more. One file per service
(``<state_dir>/failed-logs/<service>.json``, mode 0600, at most :data:`MAX_FAILED_LOG_BYTES`
of the newest lines), replaced by the service's next failure and removed with the service.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from manifests.durable import write_durable
from manifests.module import VERSION_PATTERN

log = logging.getLogger("edge_agent")

FAILED_LOGS_DIR = "failed-logs"
#: what a kept log holds at most (its newest lines); agent.toml's ``failed_log_max_bytes``
MAX_FAILED_LOG_BYTES = 256 * 1024


@dataclass(frozen=True)
class FailedLog:
    version: str
    lines: list[str]
    truncated: bool  # older lines were left out to fit


def newest_lines(lines: list[str], max_bytes: int) -> tuple[list[str], bool]:
    """The newest of ``lines`` whose UTF-8 size (with line ends) fits ``max_bytes``."""
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        size += len(line.encode("utf-8", "surrogatepass")) + 1
        if size > max_bytes:
            break
        kept.append(line)
    kept.reverse()
    return kept, len(kept) < len(lines)


class FailedLogs:
    """The kept logs of one agent's state folder."""

    def __init__(self, folder: Path, *, max_bytes: int = MAX_FAILED_LOG_BYTES) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    def _path(self, service: str) -> Path:
        return self.folder / f"{service}.json"  # service names are NAME_PATTERN: no path parts

    def keep(self, service: str, version: str, lines: list[str]) -> None:
        """Keep ``lines`` as ``service``'s failed log (replacing the one kept before)."""
        kept, truncated = newest_lines(lines, self.max_bytes)
        document = {"version": version, "lines": kept, "truncated": truncated}
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            write_durable(self._path(service), json.dumps(document).encode(), mode=0o600)
        except OSError as exc:
            # The failure itself is reported either way; only its log copy is missing.
            log.warning("could not keep the log of %s's failed version %s: %s", service, version, exc)

    def read(self, service: str) -> FailedLog | None:
        try:
            data = json.loads(self._path(service).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("lines"), list):
            return None
        version = data.get("version")
        if not isinstance(version, str) or re.fullmatch(VERSION_PATTERN, version) is None:
            return None  # not what keep() writes: as good as none
        lines = [line for line in data["lines"] if isinstance(line, str)]
        return FailedLog(version, lines, bool(data.get("truncated")))

    def remove(self, service: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(service).unlink()
