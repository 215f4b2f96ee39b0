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
from edge_agent.reconcile.supervise import log_tail_reason
from edge_agent.runtime import probe
from edge_agent.runtime.base import LaunchSpec, Runtime, read_instance_state
from edge_agent.scoring.exit_codes import EXIT_PORT_IN_USE, EXIT_START_FAILED
from edge_agent.state.records import InstanceRecord
from manifests.errors import ModuleStartFailure, Unschedulable

log = logging.getLogger(__name__)

READY_POLL_S = 0.02


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
) -> InstanceRecord:
    """Launch ``spec`` and return it once it is ready: listening, answering its health path on
    its own probe port, and (when its input schema has an example) scoring that example.

    Raises :class:`ModuleStartFailure` (init() failed, it exited, or it was not ready before
    the deadline), :class:`Unschedulable` (another program holds the port), ``Cancelled``.
    """
    runtime.prepare(spec, progress, control.cancelled, control.deadline)
    control.check(f"start of {spec.service}")
    progress("start", 0, 0)
    instance = runtime.launch(spec)
    handed_over = False
    try:
        instance = _wait_ready(runtime, instance, spec, control)
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
            lines = runtime.log_tail(instance, 30)
            if alive.exit_code == EXIT_PORT_IN_USE:
                raise Unschedulable(
                    f"port {settings.port} is held by another program on this device; free it or "
                    "deploy the service on another port"
                )
            if alive.exit_code == EXIT_START_FAILED:
                raise ModuleStartFailure(log_tail_reason(f"version {version}: init() failed", lines))
            raise ModuleStartFailure(
                log_tail_reason(f"version {version} exited with code {alive.exit_code} while starting", lines)
            )
        if time.monotonic() > control.deadline:
            raise ModuleStartFailure(
                log_tail_reason(
                    f"version {version} was not ready within {health.start_timeout_s:g}s",
                    runtime.log_tail(instance, 20),
                )
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
                f"version {version} is up but failed to score its own input example: {detail}"
            )
        time.sleep(READY_POLL_S)
