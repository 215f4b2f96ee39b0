"""The agent's persisted state (``<state_dir>/agent-state.json``) as pydantic models.

The verified desired-state bytes live beside it in ``desired.json``; this file says what the
agent did with them: which generation it applied, and per service the instance serving it,
the last version that was healthy (for rollback), the versions that failed here, restarts and
the state last reported.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from manifests.desired import ModuleAssignment, RuntimeKind
from manifests.reported import FailureDetail, Progress
from manifests.states import ServiceState

STATE_SCHEMA = "edgepack.agent-state/v1"


class InstanceRecord(BaseModel):
    """One started copy of a module: enough to find it again after the agent restarts."""

    model_config = ConfigDict(extra="forbid")

    id: str
    assignment: ModuleAssignment
    key: str  # assignment key (module digest + settings)
    runtime: RuntimeKind
    run_dir: str  # holds the scoring server's state file and, for processes, the log
    started_at: datetime
    pid: int | None = None  # process runtime: the scoring server's pid ...
    pid_start: int | None = None  # ... and its start time, so a reused pid is not taken for it
    container_id: str | None = None  # docker runtime
    probe_port: int | None = None
    # The agent's own key for an endpoint with keys (so it can probe /metrics and /score);
    # only its hash is in the instance's keys file.
    agent_key: str | None = None

    @property
    def version(self) -> str:
        return self.assignment.version

    @property
    def digest(self) -> str:
        return self.assignment.manifest_digest


class ServiceRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    current: InstanceRecord | None = None
    # The last good instance, still serving beside a new version until that one has been
    # healthy for the settle time (restart.settle_s): a new version that crash-loops leaves it
    # serving, and it becomes current again.
    standby: InstanceRecord | None = None
    last_good: ModuleAssignment | None = None  # the last version that became ready here
    previous: ModuleAssignment | None = None  # what served before the current version
    failed: dict[str, str] = Field(default_factory=dict)  # assignment key -> reason
    restarts: int = 0
    failures: int = 0  # consecutive, for the restart backoff
    state: ServiceState = ServiceState.TRANSITIONING
    reason: str | None = None
    # While Failed: the traceback and output of the instance that failed (reported beside the
    # one-line reason).
    failure: FailureDetail | None = None
    since: datetime
    # What the state is about: the assignment the desired state asks for.
    target: ModuleAssignment | None = None
    progress: Progress | None = None
    healthy_since: datetime | None = None


class DownloadTotals(BaseModel):
    """What this device has downloaded from its hub, since it was set up."""

    model_config = ConfigDict(extra="forbid")

    manifests: int = 0
    blobs: int = 0
    bytes: int = 0


class AgentRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.agent-state/v1"] = Field(default="edgepack.agent-state/v1", alias="schema")
    device_id: str
    applied_generation: int = 0
    applied_at: datetime | None = None
    last_error: str | None = None
    services: dict[str, ServiceRecord] = Field(default_factory=dict)
    downloads: DownloadTotals = Field(default_factory=DownloadTotals)
