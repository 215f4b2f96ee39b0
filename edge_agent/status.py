"""``edgepack agent status``: what the agent last recorded, read from its state folder alone
(no hub, no broker, not even a running agent needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.runtime.process import process_start_ticks
from edge_agent.state.records import AgentRecord
from edge_agent.state.store import StateStore
from manifests.desired import RuntimeKind
from manifests.device import AgentConfig

LOCK_FILE = "agent.lock"


def _agent_pid(state_dir: Path) -> int | None:
    """The pid of the agent holding the state folder's lock, if it still runs."""
    try:
        pid = int((state_dir / LOCK_FILE).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid and process_start_ticks(pid) is not None else None


def agent_status(config: AgentConfig, device_id: str) -> dict[str, Any]:
    """A JSON-ready summary: applied generation, each service's state, version, port, restarts,
    last error, and whether its process is alive (process runtime; docker is not asked)."""
    record: AgentRecord = StateStore(config.state_dir).load(device_id)
    services = []
    for name, service in sorted(record.services.items()):
        current = service.current
        alive: bool | None = None
        if current is not None and current.runtime is RuntimeKind.PROCESS and current.pid is not None:
            alive = process_start_ticks(current.pid) == current.pid_start
        target = service.target
        services.append(
            {
                "service": name,
                "state": service.state.value,
                "reason": service.reason,
                "since": service.since.isoformat(),
                "version": target.version if target else None,
                "serving_version": current.version if current else None,
                "runtime": current.runtime.value if current else (
                    target.settings.runtime.value if target and target.settings.runtime else None
                ),
                "port": target.settings.port if target else None,
                "restarts": service.restarts,
                "instance": current.id if current else None,
                "pid": current.pid if current else None,
                "container": current.container_id[:12] if current and current.container_id else None,
                "alive": alive,
                "failed_versions": len(service.failed),
            }
        )
    return {
        "device_id": record.device_id,
        "agent_pid": _agent_pid(config.state_dir),
        "applied_generation": record.applied_generation,
        "applied_at": record.applied_at.isoformat() if record.applied_at else None,
        "last_error": record.last_error,
        "downloads": record.downloads.model_dump(),
        "services": services,
    }
