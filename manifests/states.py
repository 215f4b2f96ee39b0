"""The service states, as users of cloud ML deployment know them, and the hub's one more word.

A device reports one of the five :class:`ServiceState` values for each service it runs. The
hub names a service on a device with :class:`StateOnDevice`: the reported state, or
**Pending** while the device is assigned the service but has not reported it yet. A device
never reports Pending; the hub, the CLI, the SDK and the dashboard all say it for that case
(the rules are ``cloud_hub/rollup.py``'s).
"""

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


class StateOnDevice(StrEnum):
    """A service's state on one device as the hub names it: a reported state, or Pending."""

    TRANSITIONING = ServiceState.TRANSITIONING.value
    UNHEALTHY = ServiceState.UNHEALTHY.value
    UNSCHEDULABLE = ServiceState.UNSCHEDULABLE.value
    FAILED = ServiceState.FAILED.value
    HEALTHY = ServiceState.HEALTHY.value
    PENDING = "Pending"  # assigned, not reported by the device yet

    @classmethod
    def of(cls, state: ServiceState) -> StateOnDevice:
        return cls(state.value)

    @property
    def final(self) -> bool:
        return self in (StateOnDevice.FAILED, StateOnDevice.HEALTHY)
