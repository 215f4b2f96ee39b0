"""What changed between a device's stored module states and a newly reported state.

Pure: the worker turns each :class:`Change` into an event. Only news is an event — a module
that appeared or changed version ("deployed"), a state that changed (became Healthy, failed
with a reason, Unhealthy, Unschedulable) and a module that disappeared ("removed"). A state
that merely repeats (the retained message redelivered on reconnect) is no change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from manifests.reported import ModuleStatus
from manifests.states import ServiceState


class ModuleFacts(Protocol):
    """What a change is decided on: a reported :class:`ModuleStatus`, or a stored one's columns."""

    @property
    def service(self) -> str: ...
    @property
    def state(self) -> ServiceState: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def manifest_digest(self) -> str | None: ...


@dataclass(frozen=True)
class Change:
    kind: str  # deployed | healthy | failed | unhealthy | unschedulable | transitioning | removed
    service: str
    message: str


def _short(digest: str | None) -> str:
    return digest.split(":", 1)[-1][:12] if digest else "unknown module"


def _state_change(device_id: str, new: ModuleStatus) -> Change:
    svc = new.service
    match new.state:
        case ServiceState.HEALTHY:
            return Change("healthy", svc, f"{svc} became Healthy on {device_id}")
        case ServiceState.FAILED:
            why = new.reason or "no reason given"
            return Change("failed", svc, f"{svc} failed on {device_id}: {why}")
        case _:
            suffix = f": {new.reason}" if new.reason else ""
            return Change(new.state.value.lower(), svc, f"{svc} is {new.state.value} on {device_id}{suffix}")


def module_changes(
    device_id: str, old: Mapping[str, ModuleFacts], new: Sequence[ModuleStatus]
) -> list[Change]:
    """The changes from ``old`` (by service) to ``new``, in a stable order."""
    out: list[Change] = []
    seen: set[str] = set()
    for status in sorted(new, key=lambda s: s.service):
        seen.add(status.service)
        before = old.get(status.service)
        if before is None or before.manifest_digest != status.manifest_digest:
            out.append(
                Change(
                    "deployed",
                    status.service,
                    f"{status.service} ({_short(status.manifest_digest)}) deployed on {device_id}",
                )
            )
            if status.state is not ServiceState.TRANSITIONING:
                out.append(_state_change(device_id, status))
        elif before.state is not status.state or (
            status.state is ServiceState.FAILED and before.reason != status.reason
        ):
            out.append(_state_change(device_id, status))
    for service in sorted(set(old) - seen):
        out.append(Change("removed", service, f"{service} removed from {device_id}"))
    return out
