"""Entry point of the ``edgepack`` console script: registers every command group."""

from __future__ import annotations

from packager.app import app, main
from packager.commands import (  # noqa: F401  (registers commands)
    agent_cmds,
    alert_cmds,
    balancer_cmds,
    broker_cmds,
    bundle_cmds,
    fleet_cmds,
    local_cmds,
    migrate_cmds,
    module_cmds,
    registry_cmds,
    runtime_cmds,
    webhook_cmds,
)

__all__ = ["app", "main"]
