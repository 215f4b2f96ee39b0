"""What a service is when nothing is under way for it (pure): Healthy only when the version the
desired state asks for serves.

The reconcile loop asks this after an operation ends, after a probe answers and after a
standby takes over again; the answer depends on the records alone, so the same records give
the same state whichever event asked.
"""

from __future__ import annotations

from collections.abc import Mapping

from edge_agent.reconcile.plan import assignment_key
from edge_agent.state.records import InstanceRecord
from manifests.desired import ModuleAssignment
from manifests.states import ServiceState

#: states that say why the target does not serve yet; a probe of another version keeps them
WAITING = frozenset((ServiceState.TRANSITIONING, ServiceState.UNSCHEDULABLE))


def steady_state(
    *,
    target: ModuleAssignment | None,
    current: InstanceRecord | None,
    serving: bool,
    failed: Mapping[str, str],
    state: ServiceState,
    reason: str | None,
) -> tuple[ServiceState, str | None]:
    """The state and reason of a service with no operation under way.

    ``current`` is the instance the service's records name, ``serving`` whether it is alive,
    ``failed`` the assignment keys that failed here for good, ``state``/``reason`` what the
    service says now (kept when they explain why the target does not serve yet).
    """
    if target is not None:
        key = assignment_key(target)
        why = failed.get(key)
        if why is not None:
            # The reason is the cause itself (the report names the version); a rollback is
            # said after it, on the same line.
            if serving and current is not None and current.key != key:
                return ServiceState.FAILED, (
                    f"{why}; rolled back to version {current.version}, which keeps serving"
                )
            return ServiceState.FAILED, why
        if serving and current is not None and current.key != key:
            # Healthy means the target serves. What says why it does not (a retry timer,
            # Unschedulable) stands; else the reason names the version that serves.
            if state in WAITING and reason:
                return state, reason
            return ServiceState.TRANSITIONING, (
                f"version {target.version} is not running yet; version {current.version} serves"
            )
    return (ServiceState.HEALTHY, None) if serving else (ServiceState.TRANSITIONING, None)
