"""Garbage collection of the module cache and the instances' run folders.

:func:`kept` decides from the records alone what must stay (pure); :func:`collect` removes the
rest from the disk. Each service keeps its current, standby, last good, previous and wanted
versions (for rollback), and the run folders of live instances plus a few dead ones (their
logs explain what happened).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.cache.modules import InstalledModule, ModuleCache
from edge_agent.state.records import ServiceRecord
from manifests.desired import ModuleAssignment

log = logging.getLogger("edge_agent")

#: dead instances' run folders (and logs) kept per service
DEAD_RUN_DIRS_KEPT = 3


@dataclass(frozen=True)
class Kept:
    digests: frozenset[str]  # module manifests that stay in the cache
    instances: frozenset[str]  # instance ids whose run folders stay


def kept(
    services: Mapping[str, ServiceRecord],
    in_flight: Iterable[ModuleAssignment],
    retiring: Iterable[str],
) -> Kept:
    """What stays: every version a service may run again, and every live instance."""
    digests: set[str] = {a.manifest_digest for a in in_flight}
    instances: set[str] = set(retiring)
    for service in services.values():
        current = service.current.assignment if service.current else None
        standby = service.standby.assignment if service.standby else None
        for a in (current, standby, service.last_good, service.previous, service.target):
            if a is not None:
                digests.add(a.manifest_digest)
        for instance in (service.current, service.standby):
            if instance is not None:
                instances.add(instance.id)
    return Kept(frozenset(digests), frozenset(instances))


def collect(
    cache: ModuleCache,
    installed: MutableMapping[str, InstalledModule],
    runs: Path,
    keep: Kept,
    services: Iterable[str],
) -> None:
    """Drop the modules, blobs and run folders ``keep`` does not name."""
    report = cache.prune(set(keep.digests))
    for digest in list(installed):
        if digest not in keep.digests:
            del installed[digest]
    if report.modules_removed or report.blobs_removed:
        log.info(
            "garbage collected %d module(s), %d blob(s), %d byte(s)",
            report.modules_removed,
            report.blobs_removed,
            report.bytes_freed,
        )
    prune_run_dirs(runs, set(keep.instances), set(services))


def prune_run_dirs(
    runs: Path, live: set[str], services: set[str], keep_per_service: int = DEAD_RUN_DIRS_KEPT
) -> None:
    """Keep the run folders (and logs) of live instances and the few newest dead ones."""
    if not runs.is_dir():
        return
    for service_dir in runs.iterdir():
        if not service_dir.is_dir():
            continue
        dead = [d for d in service_dir.iterdir() if d.is_dir() and d.name not in live]
        dead.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        for old in dead[keep_per_service:]:
            shutil.rmtree(old, ignore_errors=True)
        if service_dir.name not in services and not dead[:keep_per_service]:
            with contextlib.suppress(OSError):
                service_dir.rmdir()
