"""A service's state on one device, from what the device reported (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from manifests.reported import ModuleStatus
from manifests.states import ServiceState


@dataclass(frozen=True)
class DeviceServiceState:
    state: ServiceState | None  # None: the device has not reported this service yet
    reason: str | None = None


def service_state_on_device(status: ModuleStatus | None, manifest_digest: str) -> DeviceServiceState:
    """A device's state for a service as deployed now (``manifest_digest``), from its report.

    A device still reporting an older module version of the service is moving towards the new
    one, so it counts as Transitioning whatever state the old version is in. Healthy means the
    deployed version serves: a device that says Healthy while it names another version as
    serving is Transitioning.
    """
    if status is None:
        return DeviceServiceState(None, "not reported yet")
    if status.manifest_digest is not None and status.manifest_digest != manifest_digest:
        return DeviceServiceState(ServiceState.TRANSITIONING, "still running an earlier version")
    serving = status.serving_digest
    if status.state is ServiceState.HEALTHY and serving is not None and serving != manifest_digest:
        which = f"version {status.serving_version}" if status.serving_version else serving
        return DeviceServiceState(ServiceState.TRANSITIONING, f"{which} serves, not the deployed version yet")
    return DeviceServiceState(status.state, status.reason)


def seen_text(last_seen: datetime | None) -> str:
    """When a device was last heard from, for a message: ``2026-12-07 12:01:03 UTC`` or never."""
    if last_seen is None:
        return "never"
    aware = last_seen if last_seen.tzinfo is not None else last_seen.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
