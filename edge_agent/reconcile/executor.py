"""The executor: runs the loop's effects (downloads, starts, stops, retirements, polls,
certificate renewals) on worker threads, each with a deadline, and feeds every outcome back to
the loop as an event. It owns no decision and no record: the loop hands it what to do and the
instances to do it to, and reads the answers off its queue.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.cache.modules import InstalledModule, ModuleCache
from edge_agent.data.spool import spool_dir
from edge_agent.download.module import Counters, FetchControl, fetch_module
from edge_agent.reconcile.events import Event, HttpDesired, OpDone, OpProgress, Retired, Stop
from edge_agent.reconcile.operations import Control, start_instance
from edge_agent.reconcile.plan import Op
from edge_agent.reconcile.step import DRAIN_S, STOP_GRACE_S
from edge_agent.runtime.base import LaunchSpec, Runtime
from edge_agent.state.failed_logs import FAILED_LOGS_DIR, FailedLogs
from edge_agent.state.records import InstanceRecord
from edge_agent.uplink.certificates import EndpointCertificates
from edge_agent.uplink.http import HubHttp
from manifests.desired import ModuleAssignment, RuntimeKind
from manifests.device import AgentConfig, DeviceCredentials
from manifests.errors import EdgepackError, Unschedulable
from manifests.reported import Progress

log = logging.getLogger("edge_agent")

__all__ = ["Event", "Executor", "HttpDesired", "OpDone", "OpProgress", "Retired", "RunningOp", "Stop"]

FETCH_DEADLINE_S = 1800.0


@dataclass
class RunningOp:
    """One operation under way for a service, as the loop tracks it."""

    id: int
    kind: Op
    key: str | None
    assignment: ModuleAssignment | None
    control: Control
    restart: bool = False
    replaces: InstanceRecord | None = None  # the instance a Replace takes over from
    stops: tuple[InstanceRecord, ...] = ()  # the instances a Stop stops
    thread: threading.Thread | None = None


class Executor:
    def __init__(
        self,
        config: AgentConfig,
        credentials: DeviceCredentials,
        *,
        runtimes: Mapping[RuntimeKind, Runtime],
        hub: HubHttp,
        cache: ModuleCache,
        runs: Path,
        certificates: EndpointCertificates,
        counters: Counters,
        installed: Mapping[str, InstalledModule],
        emit: Callable[[Event], None],
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.runtimes = runtimes
        self.hub = hub
        self.cache = cache
        self.runs = runs
        self.certificates = certificates
        self.counters = counters
        self.installed = installed  # the loop's; read here, written by the loop only
        self.emit = emit
        self.failed_logs = FailedLogs(
            config.state_dir / FAILED_LOGS_DIR, max_bytes=config.failed_log_max_bytes
        )

    def runtime_of(self, instance: InstanceRecord) -> Runtime:
        return self.runtimes[instance.runtime]

    def deadline_of(self, op: Op, assignment: ModuleAssignment | None) -> float:
        """Seconds an operation may take."""
        if op is Op.FETCH:
            return FETCH_DEADLINE_S
        if op is Op.STOP or assignment is None:
            return STOP_GRACE_S + DRAIN_S + 5
        # Pulling an image has its own, longer deadline (the docker runtime applies it).
        docker_ok = RuntimeKind.DOCKER in self.runtimes
        may_pull = docker_ok and assignment.settings.runtime in (RuntimeKind.DOCKER, None)
        return assignment.settings.health.start_timeout_s + (
            self.config.docker.pull_timeout_s if may_pull else 0.0
        )

    # --- operations ------------------------------------------------------------------------

    def run(self, name: str, running: RunningOp) -> None:
        """Run ``running`` on a thread of its own; its outcome comes back as :class:`OpDone`."""
        match running.kind:
            case Op.FETCH:
                body: Callable[[], Any] = lambda: self._fetch(running)  # noqa: E731
            case Op.START | Op.REPLACE:
                body = lambda: self._start(running)  # noqa: E731
            case Op.STOP:
                body = lambda: self._stop(running.stops)  # noqa: E731

        def work() -> None:
            try:
                result = body()
            except BaseException as exc:
                self.emit(OpDone(name, running.id, error=exc))
            else:
                self.emit(OpDone(name, running.id, result=result))

        running.thread = threading.Thread(target=work, name=f"edgepack-{running.kind}-{name}", daemon=True)
        running.thread.start()

    def _progress(self, running: RunningOp, name: str) -> Callable[[str, int, int], None]:
        def progress(phase: str, done: int, total: int) -> None:
            report = Progress.model_validate({"phase": phase, "done_bytes": done, "total_bytes": total})
            self.emit(OpProgress(name, running.id, report))

        return progress

    def _fetch(self, running: RunningOp) -> InstalledModule:
        assert running.assignment is not None
        progress = self._progress(running, running.assignment.service)
        control = FetchControl(
            cancelled=running.control.cancelled,
            deadline=running.control.deadline,
            progress=lambda done, total: progress("download", done, total),
        )
        return fetch_module(
            self.hub,
            self.cache,
            running.assignment.manifest_digest,
            self.credentials.publishers,
            control,
            self.counters,
        )

    def _start(self, running: RunningOp) -> InstanceRecord:
        assignment = running.assignment
        assert assignment is not None and running.key is not None
        name = assignment.service
        module = self.installed.get(assignment.manifest_digest)
        if module is None:
            module = self._fetch(running)
        runtime = self.choose_runtime(module, assignment)
        serving = running.replaces
        instance_id = f"{assignment.version}-{os.urandom(4).hex()}"
        settings = assignment.settings
        spec = LaunchSpec(
            instance_id=instance_id,
            assignment=assignment,
            key=running.key,
            module=module,
            run_dir=self.runs / name / instance_id,
            host=self.config.service_host,
            drain_s=DRAIN_S,
            tls=self.certificates.material(name) if settings.tls is not None else None,
            agent_key=os.urandom(16).hex() if settings.auth is not None else None,
            data_dir=spool_dir(self.config.state_dir, name) if settings.data_collection is not None else None,
        )
        progress = self._progress(running, name)
        if serving is not None and serving.runtime is not runtime.kind:
            # The new runtime gets ready (the image pulled and checked) while the old version
            # still serves: an image that cannot run the module fails here, not after the stop.
            runtime.prepare(spec, progress, running.control.cancelled, running.control.deadline)
            # Processes and containers run as different users, which SO_REUSEPORT does not let
            # share a port: the old version stops before the new one starts.
            log.info("%s moves from the %s to the %s runtime: stopping the old version first",
                     name, serving.runtime, runtime.kind)  # fmt: skip
            self.runtimes[serving.runtime].stop(serving, grace_s=STOP_GRACE_S + DRAIN_S)
        return start_instance(runtime, spec, running.control, progress=progress, failed_logs=self.failed_logs)

    def choose_runtime(self, module: InstalledModule, assignment: ModuleAssignment) -> Runtime:
        """The runtime the deployment names, or else the first of this device's runtimes (in
        agent.toml's order) that can run the module; Unschedulable with every reason if none can."""
        wanted = assignment.settings.runtime
        candidates = [wanted] if wanted is not None else list(self.config.runtimes)
        reasons = []
        for kind in candidates:
            runtime = self.runtimes.get(kind)
            if runtime is None:
                continue
            why = runtime.unschedulable(module, assignment)
            if why is None:
                return runtime
            reasons.append(why)
        raise Unschedulable("; ".join(reasons) or "no runtime of this device can run the module")

    def _stop(self, instances: tuple[InstanceRecord, ...]) -> None:
        for instance in instances:
            self.runtime_of(instance).stop(instance, grace_s=STOP_GRACE_S + DRAIN_S)

    # --- background effects ------------------------------------------------------------------

    def retire(self, name: str, instance: InstanceRecord, *, grace_s: float) -> None:
        """Stop an instance that no longer serves (it drains first unless ``grace_s`` is 0);
        :class:`Retired` says when it is gone."""

        def work() -> None:
            try:
                self.runtime_of(instance).stop(instance, grace_s=grace_s)
            except Exception:
                log.exception("stopping instance %s failed", instance.id)
            self.emit(Retired(instance.id))

        threading.Thread(target=work, name=f"edgepack-retire-{name}", daemon=True).start()

    def poll(self, etag: str | None) -> None:
        """Ask the hub for the desired state; :class:`HttpDesired` brings the answer."""

        def work() -> None:
            try:
                self.emit(HttpDesired(self.hub.desired(etag)))
            except EdgepackError as exc:
                self.emit(HttpDesired(None, exc))
            except Exception as exc:  # never let a poll thread die silently
                log.exception("desired-state poll failed")
                self.emit(HttpDesired(None, EdgepackError(str(exc))))

        threading.Thread(target=work, name="edgepack-poll", daemon=True).start()

    def renew_certificates(self, due: list[tuple[str, InstanceRecord]]) -> None:
        """Renew the certificates of the TLS services in ``due`` and hand them to their
        running instances."""

        def work() -> None:
            for name, instance in due:
                try:
                    material = self.certificates.material(name)
                    self.runtime_of(instance).update_endpoint(
                        instance, instance.assignment.settings.auth, material
                    )
                except EdgepackError as exc:
                    log.warning("%s: certificate not renewed (%s); trying again later", name, exc)

        threading.Thread(target=work, name="edgepack-certificates", daemon=True).start()
