"""What an agent reports: the state of each module it runs, and telemetry samples."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from manifests.bounds import (
    MAX_LOG_TAIL_CHARS,
    MAX_TRACEBACK_CHARS,
    Count,
    LogTailText,
    Port,
    Reason,
    TracebackText,
    finite,
    multiline,
)
from manifests.desired import DEVICE_ID_PATTERN, MAX_CPUS, MAX_MEMORY_MB, MAX_MODULES, RuntimeKind
from manifests.digests import DIGEST_PATTERN
from manifests.module import NAME_PATTERN, VERSION_PATTERN
from manifests.states import ServiceState

#: No module serves more requests a second than this, or answers slower than an hour.
MAX_RATE = 1e9
MAX_LATENCY_MS = 3_600_000.0
MAX_CPU_PERCENT = 100.0 * MAX_CPUS
#: What the details of all of one report's failed services may hold together; the agent leaves
#: out the details beyond it (the one-line ``reason`` stays), so a device with many failed
#: services still fits the hub's report size limit (256 KiB).
MAX_REPORT_FAILURE_CHARS = 64 * 1024


class Progress(BaseModel):
    """How far a module in ``Transitioning`` has come (downloading blobs, pulling an image)."""

    model_config = ConfigDict(extra="forbid")

    phase: Literal["download", "pull", "start", "switch"]
    done_bytes: Count = 0
    total_bytes: Count = 0


class FailureDetail(BaseModel):
    """Why a module failed, beyond its one-line ``reason``: the last traceback (once, as Python
    printed it; None when the failure was not a Python exception, e.g. a crash or a timeout)
    and the last lines the instance wrote. Each keeps its end within its limit; control
    characters other than tab and newline arrive escaped as visible text (``\\x1b``)."""

    model_config = ConfigDict(extra="forbid")

    traceback: TracebackText | None = None
    log_tail: LogTailText | None = None

    @classmethod
    def of(cls, *, traceback: str | None, log_lines: list[str]) -> FailureDetail:
        """The detail of raw text a module produced, made fit to report (see the class)."""
        tail = multiline("\n".join(log_lines), MAX_LOG_TAIL_CHARS).strip("\n")
        return cls(
            traceback=multiline(traceback, MAX_TRACEBACK_CHARS) if traceback else None,
            log_tail=tail or None,
        )

    def size(self) -> int:
        return len(self.traceback or "") + len(self.log_tail or "")


class ModuleStatus(BaseModel):
    """One service on one device.

    ``manifest_digest``/``version`` name the module version the state is about: the one the
    desired state asks for. What answers requests right now is ``serving_digest`` /
    ``serving_version``; they differ while an update is under way and after a rollback
    (``Failed`` for the desired version while the previous one keeps serving).

    ``reason`` is one line (e.g. ``score.py:18 RuntimeError: cannot open the feature store``);
    ``failure`` holds the traceback and the output's tail while the service is Failed.
    """

    model_config = ConfigDict(extra="forbid")

    service: str = Field(pattern=NAME_PATTERN)
    manifest_digest: str | None = Field(default=None, pattern=DIGEST_PATTERN)
    version: str | None = Field(default=None, pattern=VERSION_PATTERN)
    generation: Count | None = Field(default=None, description="desired-state generation")
    state: ServiceState
    reason: Reason | None = None
    failure: FailureDetail | None = Field(
        default=None, description="the traceback and log tail of the failed version, while Failed"
    )
    since: datetime
    runtime: RuntimeKind | None = None
    port: Port | None = None
    restarts: Count = 0
    serving_digest: str | None = Field(default=None, pattern=DIGEST_PATTERN)
    serving_version: str | None = Field(default=None, pattern=VERSION_PATTERN)
    progress: Progress | None = None
    endpoint: str | None = Field(
        default=None,
        max_length=300,
        pattern=r"^https?://[^\s/]+$",
        description="where clients reach the service on this device (scheme://host:port)",
    )


class ReportedState(BaseModel):
    """Full reported state of one device (retained on ``.../reported``)."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.reported/v1"] = Field(
        default="edgepack.reported/v1", alias="schema"
    )
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    reported_at: datetime
    agent_version: str = Field(max_length=64, pattern=r"^[\x21-\x7e]*$")
    applied_generation: Count
    runtimes: list[RuntimeKind] = Field(default_factory=list, max_length=8)
    last_error: Reason | None = None
    link_problem: Reason | None = Field(
        default=None,
        description="what the device's broker session suffers from now, when it is not the "
        "network: e.g. another client connecting with this device's id (two agents with one "
        "device's credentials); the hub records it as an event",
    )
    modules: list[ModuleStatus] = Field(default_factory=list, max_length=MAX_MODULES)


class ModuleMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str = Field(pattern=NAME_PATTERN)
    requests_total: Count
    errors_total: Count
    requests_per_s: float = finite(ge=0, le=MAX_RATE)
    p50_ms: float | None = finite(default=None, ge=0, le=MAX_LATENCY_MS)
    # Optional: agents before it send p50/p99 only, and their samples stay valid.
    p95_ms: float | None = finite(default=None, ge=0, le=MAX_LATENCY_MS)
    p99_ms: float | None = finite(default=None, ge=0, le=MAX_LATENCY_MS)
    cpu_percent: float | None = finite(default=None, ge=0, le=MAX_CPU_PERCENT)
    memory_mb: float | None = finite(default=None, ge=0, le=MAX_MEMORY_MB)
    # The time the module's own run() took, without the server's parsing and queueing.
    run_p50_ms: float | None = finite(default=None, ge=0, le=MAX_LATENCY_MS)
    run_p95_ms: float | None = finite(default=None, ge=0, le=MAX_LATENCY_MS)
    # Collected production data (manifests.data): what waits in the device's spool, and the
    # records dropped since the agent started because the spool was full (oldest first).
    data_spooled_bytes: Count | None = None
    data_dropped_total: Count | None = None


class Telemetry(BaseModel):
    """One metrics sample (``.../telemetry``, QoS 0, not retained)."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.telemetry/v1"] = Field(
        default="edgepack.telemetry/v1", alias="schema"
    )
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    ts: datetime
    cpu_percent: float | None = finite(default=None, ge=0, le=MAX_CPU_PERCENT)
    memory_mb: float | None = finite(default=None, ge=0, le=MAX_MEMORY_MB)
    agent_memory_mb: float | None = finite(default=None, ge=0, le=MAX_MEMORY_MB)
    modules: list[ModuleMetrics] = Field(default_factory=list, max_length=MAX_MODULES)
