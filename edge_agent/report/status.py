"""The reported state, built from the agent's records (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from edge_agent.state.records import AgentRecord
from manifests.bounds import one_line
from manifests.desired import ModuleAssignment, RuntimeKind
from manifests.reported import MAX_REPORT_FAILURE_CHARS, ModuleStatus, ReportedState
from manifests.states import ServiceState


def module_status(
    record: AgentRecord,
    assignment: ModuleAssignment,
    *,
    serving_alive: bool,
    standby_alive: bool = False,
    host: str | None = None,
) -> ModuleStatus:
    service = record.services.get(assignment.service)
    current = service.current if service else None
    serving = current if current is not None and serving_alive else None
    if serving is None and service is not None and service.standby is not None and standby_alive:
        serving = service.standby  # the last good instance serves while the new one restarts
    scheme = "https" if assignment.settings.tls is not None else "http"
    return ModuleStatus(
        service=assignment.service,
        manifest_digest=assignment.manifest_digest,
        version=assignment.version,
        generation=record.applied_generation,
        state=service.state if service else ServiceState.TRANSITIONING,
        reason=one_line(service.reason) if service and service.reason else None,
        failure=service.failure if service and service.state is ServiceState.FAILED else None,
        since=service.since if service else (record.applied_at or datetime.fromtimestamp(0, UTC)),
        runtime=serving.runtime if serving else assignment.settings.runtime,
        port=assignment.settings.port,
        restarts=service.restarts if service else 0,
        serving_digest=serving.digest if serving else None,
        serving_version=serving.version if serving else None,
        progress=service.progress if service else None,
        endpoint=f"{scheme}://{host}:{assignment.settings.port}" if host else None,
    )


def reported_state(
    record: AgentRecord,
    desired: Sequence[ModuleAssignment],
    *,
    alive: Mapping[str, bool],
    runtimes: Sequence[RuntimeKind],
    agent_version: str,
    now: datetime,
    host: str | None = None,
) -> ReportedState:
    """One status per service the applied desired state lists, in its order."""
    modules = []
    budget = MAX_REPORT_FAILURE_CHARS
    for assignment in desired:
        service = record.services.get(assignment.service)
        current = service.current if service else None
        serving_alive = current is not None and alive.get(current.id, False)
        standby = service.standby if service else None
        standby_alive = standby is not None and alive.get(standby.id, False)
        status = module_status(
            record, assignment, serving_alive=serving_alive, standby_alive=standby_alive, host=host
        )
        if status.failure is not None:
            # Details beyond the report's budget are left out; their one-line reason stays.
            budget -= status.failure.size()
            if budget < 0:
                status = status.model_copy(update={"failure": None})
        modules.append(status)
    return ReportedState(
        device_id=record.device_id,
        reported_at=now,
        agent_version=agent_version[:64],
        applied_generation=record.applied_generation,
        runtimes=list(runtimes),
        last_error=record.last_error[:2000] if record.last_error else None,
        modules=modules,
    )
