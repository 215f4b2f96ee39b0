"""Rolling per-device module states up into one service state.

Precedence, worst first — the rolled-up state is the first that any device is in:

1. **Failed** — some device could not deploy it; final, and someone has to act.
2. **Unschedulable** — some device cannot place it now (resources, runtime); needs action.
3. **Unhealthy** — deployed somewhere but not answering its health probe.
4. **Transitioning** — still being deployed somewhere, or a targeted device has not reported
   the service yet (``None``).
5. **Healthy** — only when every targeted device reports it Healthy.

A service that targets no device at all is **Unschedulable**: there is nowhere to run it, and
calling that Healthy would let ``edgepack service wait`` succeed for a selector that matches
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from manifests.states import ServiceState

PRECEDENCE: tuple[ServiceState, ...] = (
    ServiceState.FAILED,
    ServiceState.UNSCHEDULABLE,
    ServiceState.UNHEALTHY,
    ServiceState.TRANSITIONING,
    ServiceState.HEALTHY,
)


def rollup_states(states: Sequence[ServiceState | None]) -> ServiceState:
    """One state for a service from its state on each targeted device (None = not reported)."""
    if not states:
        return ServiceState.UNSCHEDULABLE
    present = {ServiceState.TRANSITIONING if s is None else s for s in states}
    for state in PRECEDENCE:
        if state in present:
            return state
    raise AssertionError("unreachable: every ServiceState is in PRECEDENCE")
