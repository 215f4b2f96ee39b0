"""The bodies of the executor's operations (run in worker threads, one per service).

Each takes what it needs, checks its cancel flag and deadline at every safe point, and returns
a value or raises an error from the ``manifests.errors`` tree; the reconcile loop reacts to the
error's class. An instance an operation launched is never left behind: if the operation does
not hand it over (cancelled, failed, timed out), it stops it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.download.module import Cancelled
from edge_agent.runtime import probe
from edge_agent.runtime.base import LaunchSpec, Runtime, read_instance_state
from edge_agent.scoring.exit_codes import EXIT_PORT_IN_USE, EXIT_START_FAILED
from edge_agent.scoring.failure import from_output, read_failure
from edge_agent.state.failed_logs import FailedLogs
from edge_agent.state.records import InstanceRecord
from manifests.bounds import one_line
from manifests.errors import ModuleStartFailure, Unschedulable
from manifests.module import SRC_ROOT

log = logging.getLogger(__name__)

READY_POLL_S = 0.02
#: lines of a failed instance's output read for its kept log (FailedLogs bounds their size) and
#: its report (whose tail keeps 8 KiB of them)
FAILURE_LOG_LINES = 5000


@dataclass
class Control:
    """The handle the loop keeps on a running operation."""

    deadline: float  # time.monotonic()
    cancel: threading.Event = field(default_factory=threading.Event)

    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def check(self, what: str) -> None:
        if self.cancel.is_set():
            raise Cancelled(what)


def start_instance(
    runtime: Runtime,
    spec: LaunchSpec,
    control: Control,
    *,
    progress: Callable[[str, int, int], None],
    failed_logs: FailedLogs | None = None,
) -> InstanceRecord:
    """Launch ``spec`` and return it once it is ready: listening, answering its health path on
    its own probe port, and (when its input schema has an example) scoring that example.

    Raises :class:`ModuleStartFailure` (init() failed, it exited, or it was not ready before
    the deadline), :class:`Unschedulable` (another program holds the port), ``Cancelled``.
    The output of an instance that failed to start is kept in ``failed_logs`` (before it is
    stopped: a container's log goes with it).
    """
    runtime.prepare(spec, progress, control.cancelled, control.deadline)
    control.check(f"start of {spec.service}")
    progress("start", 0, 0)
    instance = runtime.launch(spec)
    handed_over = False
    try:
        try:
            instance = _wait_ready(runtime, instance, spec, control)
        except ModuleStartFailure as exc:
            if failed_logs is not None:
                failed_logs.keep(spec.service, spec.assignment.version, exc.log_lines)
            raise
        handed_over = True
        log.info("%s version %s ready (instance %s)", spec.service, spec.assignment.version, instance.id)
        return instance
    finally:
        if not handed_over:
            runtime.stop(instance, grace_s=5.0)


def _wait_ready(
    runtime: Runtime, instance: InstanceRecord, spec: LaunchSpec, control: Control
) -> InstanceRecord:
    settings = spec.assignment.settings
    health = settings.health
    version = spec.assignment.version
    example: bytes | None = None
    example_checked = False
    while True:
        control.check(f"start of {spec.service}")
        alive = runtime.liveness(instance)
        if not alive.alive:
            if alive.exit_code == EXIT_PORT_IN_USE:
                raise Unschedulable(
                    f"port {settings.port} is held by another program on this device; free it or "
                    "deploy the service on another port"
                )
            lines = runtime.log_tail(instance, FAILURE_LOG_LINES)
            written = None
            if alive.exit_code == EXIT_START_FAILED:
                code_dir = spec.module.dir / SRC_ROOT
                written = read_failure(spec.run_dir) or from_output(lines, code_dir)
            if written is not None:
                raise ModuleStartFailure(written.cause, traceback=written.traceback, log_lines=lines)
            raise ModuleStartFailure(
                f"version {version} exited with code {alive.exit_code} before it answered on {health.path}",
                log_lines=lines,
            )
        if time.monotonic() > control.deadline:
            raise ModuleStartFailure(
                f"version {version} did not answer on {health.path} within {health.start_timeout_s:g}s",
                log_lines=runtime.log_tail(instance, FAILURE_LOG_LINES),
            )
        state = read_instance_state(spec.run_dir)
        port = state.get("probe_port") if state else None
        target = probe.Target.of(instance, port) if isinstance(port, int) else None
        if target is not None and probe.healthy(target, health.path, health.timeout_s):
            if not example_checked:
                example = probe.input_example(target, health.timeout_s)
                example_checked = True
            if example is None:
                return instance.model_copy(update={"probe_port": port})
            answer = probe.score(target, example, max(health.timeout_s, 10.0))
            if answer is not None and answer[0] == 200:
                return instance.model_copy(update={"probe_port": port})
            detail = answer[1][:300].decode(errors="replace") if answer else "no answer"
            raise ModuleStartFailure(
                one_line(f"version {version} is up but failed to score its own input example: {detail}"),
                log_lines=runtime.log_tail(instance, FAILURE_LOG_LINES),
            )
        time.sleep(READY_POLL_S)
