"""Taking the agent off a device for good (``edgepack agent uninstall-service --purge``):
stop the modules it started, then delete its state folder.

Modules outlive their agent by design (an agent restart must not interrupt scoring), so
removing the agent alone would leave them serving with nobody to supervise them; they are
stopped through the same runtimes that started them, from what the state folder records.
"""

from __future__ import annotations

import logging
import shutil

from edge_agent.daemon import build_runtimes
from edge_agent.state.store import StateStore
from edge_agent.status import agent_status
from manifests.device import AgentConfig
from manifests.errors import ConfigError

log = logging.getLogger(__name__)

#: what a module gets to finish its requests before it is killed
STOP_GRACE_S = 10.0


def stop_modules(config: AgentConfig, device_id: str) -> list[str]:
    """Stop every instance the state folder records; the ids of those stopped."""
    if agent_status(config, device_id)["agent_pid"]:
        raise ConfigError(
            f"an agent still runs on {config.state_dir}; stop it first "
            "(systemctl stop, or SIGTERM to its pid)"
        )
    record = StateStore(config.state_dir).load(device_id)
    runtimes = build_runtimes(config, device_id)
    stopped = []
    for service in record.services.values():
        for instance in (service.current, service.standby):
            if instance is None:
                continue
            runtime = runtimes.get(instance.runtime)
            if runtime is None:
                log.warning("%s runs on %s, not enabled in agent.toml", instance.id, instance.runtime)
                continue
            runtime.stop(instance, grace_s=STOP_GRACE_S)
            stopped.append(instance.id)
    return stopped


def purge(config: AgentConfig, device_id: str) -> list[str]:
    """Stop the modules, then delete the state folder (cache, records, logs, spool)."""
    stopped = stop_modules(config, device_id)
    shutil.rmtree(config.state_dir, ignore_errors=False)
    return stopped
