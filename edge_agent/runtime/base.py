"""What every runtime offers the executor, and what a launched instance is."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_agent.cache.modules import InstalledModule
from edge_agent.runtime.endpoint_files import TlsMaterial
from edge_agent.state.records import InstanceRecord
from manifests.desired import EndpointAuth, ModuleAssignment, RuntimeKind, check_module_signers

#: the scoring server's state file inside an instance's run folder (pid, ports)
#: the runtime image's user, who owns what the docker runtime gives a container to write
CONTAINER_UID = 10001
STATE_FILE = "instance.json"
#: the module's stdout and stderr, for the process runtime
LOG_FILE = "module.log"

_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one instance of a module."""

    instance_id: str
    assignment: ModuleAssignment
    key: str
    module: InstalledModule
    run_dir: Path
    host: str  # the address the public port binds
    drain_s: float
    tls: TlsMaterial | None = None  # when the assignment asks for TLS
    agent_key: str | None = None  # the agent's own endpoint key, when the assignment has keys
    data_dir: Path | None = None  # the service's data spool, when its deployment collects data

    def __post_init__(self) -> None:
        # Every start, of a fresh download or of a cached module, builds a spec first: nothing
        # launches a module the desired state does not allow its signer to publish.
        check_module_signers(self.assignment, self.module.signers)

    @property
    def service(self) -> str:
        return self.assignment.service


def instance_arguments(spec: LaunchSpec, state_file: str) -> list[str]:
    """The scoring server's options for an instance the agent runs (both runtimes): ready
    before it listens, sharing the port, a private probe port, a state file, a drain."""
    settings = spec.assignment.settings
    return [
        "--host", spec.host,
        "--port", str(settings.port),
        "--workers", str(settings.workers),
        "--preload", "--reuse-port", "--exit-on-crash",
        "--probe-port", "0",
        "--state-file", state_file,
        "--drain-s", str(spec.drain_s),
        "--log-level", "info",
    ]  # fmt: skip


def requirement_names(requirements: Sequence[str]) -> list[str]:
    """The distribution names of pip requirement strings (``numpy>=1.26`` → ``numpy``,
    ``uvicorn[standard]`` → ``uvicorn``), each once, in order; what a runtime checks is
    installed (by presence, not version)."""
    names: list[str] = []
    for requirement in requirements:
        match = _REQUIREMENT_NAME.match(requirement)
        if match is not None and match.group(1) not in names:
            names.append(match.group(1))
    return names


@dataclass(frozen=True)
class Liveness:
    alive: bool
    exit_code: int | None = None  # when it is known (not for a process of an earlier agent)


@dataclass(frozen=True)
class Usage:
    """Cumulative CPU seconds and current memory of an instance (all its processes)."""

    cpu_s: float
    memory_mb: float


#: progress callback: phase, bytes done, bytes total
Progress = Callable[[str, int, int], None]


class Runtime(Protocol):
    kind: RuntimeKind

    def unschedulable(self, module: InstalledModule, assignment: ModuleAssignment) -> str | None:
        """Why this runtime cannot run the module here (None when it can)."""

    def prepare(
        self, spec: LaunchSpec, progress: Progress, cancelled: Callable[[], bool], deadline: float
    ) -> None:
        """Whatever must happen before the first launch (the docker runtime pulls the image),
        by ``deadline`` (``time.monotonic()``)."""

    def launch(self, spec: LaunchSpec) -> InstanceRecord:
        """Start the instance; returns at once (readiness is the caller's to wait for)."""

    def liveness(self, instance: InstanceRecord) -> Liveness: ...

    def stop(self, instance: InstanceRecord, *, grace_s: float) -> None:
        """SIGTERM (the instance drains), then kill after ``grace_s``; forget its resources."""

    def log_tail(self, instance: InstanceRecord, lines: int) -> list[str]: ...

    def usage(self, instance: InstanceRecord) -> Usage | None: ...

    def maintain(self, instance: InstanceRecord) -> None:
        """Periodic upkeep of a serving instance (the process runtime rotates its log)."""

    def update_endpoint(
        self, instance: InstanceRecord, auth: EndpointAuth | None, tls: TlsMaterial | None
    ) -> None:
        """Rotate a running instance's keys, or renew its certificate, without a restart."""

    def reap_orphans(self, known: set[str]) -> list[str]:
        """Stop instances running for this device that ``known`` (instance ids) does not
        list: left by an agent that died between a launch and saving its state. Returns the
        ids stopped."""


def read_instance_state(run_dir: Path) -> dict[str, int] | None:
    """The scoring server's state file (written once it listens), or None before that."""
    try:
        data = json.loads((run_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tail_lines(path: Path, lines: int, *, max_bytes: int = 1 << 20) -> list[str]:
    """The last ``lines`` lines of a text file, reading at most ``max_bytes`` from its end."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and text:
        text = text[1:]  # the first line read is most likely cut
    return text[-lines:] if lines > 0 else []
