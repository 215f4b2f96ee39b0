"""The five service states, as users of cloud ML deployment know them."""

from __future__ import annotations

from enum import StrEnum


class ServiceState(StrEnum):
    TRANSITIONING = "Transitioning"  # being deployed: downloading, pulling, starting
    UNHEALTHY = "Unhealthy"  # deployed but not answering its health probe
    UNSCHEDULABLE = "Unschedulable"  # cannot be placed now (resources, unsupported runtime)
    FAILED = "Failed"  # could not be deployed (bad signature, crash loop, image missing)
    HEALTHY = "Healthy"  # serving

    @property
    def final(self) -> bool:
        return self in (ServiceState.FAILED, ServiceState.HEALTHY)
