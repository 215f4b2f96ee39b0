"""The systemd unit ``edgepack agent install-service`` writes: a hardened service for the
device agent.

Why each setting is there:

- ``Type=notify`` and ``WatchdogSec``: the agent says READY once it serves from its cache and
  pings the watchdog on every turn of its loop (``edge_agent.service_manager``); an agent whose
  loop hangs is restarted although its process exists.
- ``KillMode=process``: modules outlive their agent by design, so an agent restart or upgrade
  does not interrupt scoring. With systemd's default (the whole control group) every restart of
  the agent would kill the models it serves.
- Its own system user, ``NoNewPrivileges``, no capabilities, ``ProtectSystem=strict`` with only
  the state folder writable, ``ProtectHome=read-only`` (a venv may live in a home folder),
  private ``/tmp``, kernel tunables, modules, logs and control groups protected.
- ``SupplementaryGroups=docker`` only when the docker runtime is enabled: membership of that
  group is root on the host, so a process-only device does not get it. With it, the agent keeps
  :data:`DOCKER_CAPABILITIES` (and no other): it hands each container's run folder and data
  spool to the image's user (``chown``), then reads, replaces and deletes what the container
  wrote there (0600 files in 0700 folders of that user). That gives nothing the docker group
  does not already give; without them no container could start.
- No ``PrivateDevices``, ``MemoryDenyWriteExecute`` or system-call filter: modules run in the
  agent's sandbox, and accelerators (``/dev``), JIT-compiling runtimes and native extensions
  would break under them. The docker runtime confines its modules itself.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

DEFAULT_UNIT_NAME = "edgepack-agent"
DEFAULT_USER = "edgepack"
DEFAULT_WATCHDOG_S = 60
#: What the docker runtime needs of root's powers (edge_agent.runtime.docker: chown of the
#: folders it mounts into containers, and access to the files containers leave in them).
DOCKER_CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER")


@dataclass(frozen=True)
class UnitSpec:
    python: Path
    config: Path
    state_dir: Path
    device_id: str
    user: str = DEFAULT_USER
    docker: bool = False
    watchdog_s: int = DEFAULT_WATCHDOG_S


def _path(value: Path) -> str:
    # systemd splits ExecStart like a shell; paths with spaces must be quoted.
    return shlex.quote(str(value))


def render_unit(spec: UnitSpec) -> str:
    exec_start = f"{_path(spec.python)} -m edge_agent --config {_path(spec.config)}"
    docker_lines = "SupplementaryGroups=docker\n" if spec.docker else ""
    capabilities = " ".join(DOCKER_CAPABILITIES) if spec.docker else ""
    after = "network-online.target docker.service" if spec.docker else "network-online.target"
    return f"""# Written by 'edgepack agent install-service'; 'edgepack agent uninstall-service' removes it.
# What each setting is for: docs/agent.md, "Running under systemd".
[Unit]
Description=edgepack device agent ({spec.device_id})
Wants=network-online.target
After={after}

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
User={spec.user}
{docker_lines}Restart=always
RestartSec=5
WatchdogSec={spec.watchdog_s}
TimeoutStartSec=300
TimeoutStopSec=60
KillMode=process
KillSignal=SIGTERM
UMask=0077
NoNewPrivileges=yes
CapabilityBoundingSet={capabilities}
AmbientCapabilities={capabilities}
ProtectSystem=strict
ReadWritePaths={_path(spec.state_dir)}
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""
