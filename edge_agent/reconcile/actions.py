"""Carrying out what a step of the reconcile loop asks for (its actions): operations handed to
the executor with their deadlines, retirements, log lines, the prober's watch list, log
requests, and the flags that ask the loop to plan, collect garbage, save or report. Also the
state file, the reported state and garbage collection, done when the loop says so.

The records are the loop's; every method here reads the ones it is given and changes none.
What it keeps is what the frozen records cannot hold: the running operations (their threads
and cancel events) and the modules installed in the cache.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime

from edge_agent.cache.modules import InstalledModule, ModuleCache
from edge_agent.download.module import Counters
from edge_agent.health import Prober, Watched
from edge_agent.reconcile import step as decide
from edge_agent.reconcile.executor import Executor, RunningOp
from edge_agent.reconcile.garbage import collect, kept
from edge_agent.reconcile.logs import answer_log_request
from edge_agent.reconcile.operations import Control
from edge_agent.reconcile.step import DRAIN_S, STOP_GRACE_S
from edge_agent.report.status import reported_state
from edge_agent.runtime.base import Runtime
from edge_agent.state.records import DownloadTotals, InstanceRecord
from edge_agent.state.store import StateStore
from manifests.compat import encode_for_hub
from manifests.desired import RuntimeKind
from manifests.device import AgentConfig, DeviceCredentials
from manifests.errors import EdgepackError

log = logging.getLogger("edge_agent")


def advertised_host(config: AgentConfig) -> str:
    """The host a client uses to reach this device's modules."""
    if config.advertise_host:
        return config.advertise_host
    if config.service_host not in ("0.0.0.0", "::", ""):
        return f"[{config.service_host}]" if ":" in config.service_host else config.service_host
    return socket.gethostname()



class Actions:
    def __init__(
        self,
        config: AgentConfig,
        credentials: DeviceCredentials,
        *,
        runtimes: Mapping[RuntimeKind, Runtime],
        store: StateStore,
        cache: ModuleCache,
        executor: Executor,
        installed: dict[str, InstalledModule],
        counters: Counters,
        prober: Prober,
        publish_reported: Callable[[bytes], None],
        publish_logs: Callable[[bytes], None],
        agent_version: str,
        clock: Callable[[], float],
    ) -> None:
        self.config, self.credentials, self.runtimes = config, credentials, runtimes
        self.store, self.cache, self.executor = store, cache, executor
        self.installed, self.counters, self.prober = installed, counters, prober
        self.publish_reported, self.publish_logs = publish_reported, publish_logs
        self.agent_version, self.clock = agent_version, clock
        self.advertised = advertised_host(config)
        self.ops: dict[str, RunningOp] = {}
        # What the loop is asked to do after this batch of events.
        self.plan, self.report, self.save, self.gc = True, True, False, True
        self.stopping = False

    def runtime_of(self, instance: InstanceRecord) -> Runtime:
        return self.runtimes[instance.runtime]

    def persist(self, effects: tuple[decide.Action, ...]) -> None:
        """Save an accepted desired state's bytes: before anything is done by it."""
        for effect in effects:
            if isinstance(effect, decide.SaveDesired):
                self.store.save_desired(effect.payload)

    def carry_out(self, records: decide.Records, effects: tuple[decide.Action, ...]) -> None:
        """Carry out what a step asked for; ``records`` are the ones it returned (kept by the
        loop already), and a desired state's bytes are saved already."""
        for name in [name for name in self.ops if name not in records.ops]:
            del self.ops[name]
        for effect in effects:
            match effect:
                case decide.Dirty(save=save, report=report, plan=plan_again):
                    self.save |= save
                    self.report |= report
                    self.plan |= plan_again
                case decide.Retire(service=name, instance=instance, grace_s=grace_s):
                    self.executor.retire(name, instance, grace_s=grace_s)
                case decide.Watch():
                    self.watch(records)
                case decide.Say(level=level, text=text, error=error):
                    log.log(level, "%s", text, exc_info=error)
                case decide.Forget(service=name):
                    self.executor.failed_logs.remove(name)
                    self.watch(records)
                    self.gc = True
                    log.info("%s removed", name)
                case decide.Installed(module=module):
                    self.installed[module.manifest_digest] = module
                case decide.Collect():
                    self.gc = True
                case decide.RotateKeys(instance=instance, auth=auth):
                    self.runtime_of(instance).update_endpoint(instance, auth, None)
                case decide.AnswerLogs(payload=payload):
                    self._answer_logs(records, payload)
                case decide.Halt():
                    self.stopping = True
                case decide.Dispatch(service=name, op=op, replaces=replaces, stops=stops):
                    self._dispatch(name, op, replaces, stops)
                case decide.Cancel(service=name):
                    running = self.ops.get(name)
                    if running is not None and not running.control.cancel.is_set():
                        log.info("%s: cancelling %s (the desired state moved on)", name, running.kind)
                        running.control.cancel.set()
                case decide.SaveDesired():
                    pass

    def _dispatch(
        self, name: str, op: decide.OpView, replaces: InstanceRecord | None, stops: tuple[InstanceRecord, ...]
    ) -> None:
        deadline = self.clock() + self.executor.deadline_of(op.kind, op.assignment)
        running = RunningOp(
            id=op.id,
            kind=op.kind,
            key=op.key,
            assignment=op.assignment,
            control=Control(deadline=deadline),
            restart=op.restart,
            replaces=replaces,
            stops=stops,
        )
        self.ops[name] = running
        self.executor.run(name, running)

    def _answer_logs(self, records: decide.Records, payload: bytes) -> None:
        def serving(name: str) -> InstanceRecord | None:
            service = records.agent.services.get(name)
            return service.current if service else None

        answer_log_request(
            payload,
            device_id=self.credentials.device_id,
            serving=serving,
            runtime_of=self.runtime_of,
            publish=self.publish_logs,
            failed_logs=self.executor.failed_logs,
            hub_reads_newer=records.hub_reads_newer,
        )

    def watch(self, records: decide.Records) -> None:
        """Probe the serving instances of ``records``."""
        services = records.agent.services.items()
        self.prober.watch([Watched(name, s.current) for name, s in services if s.current is not None])

    def cached(self, digest: str) -> bool:
        """Whether the module ``digest`` is installed in the cache (and still verifies)."""
        if digest in self.installed:
            return True
        if not self.cache.module_dir(digest).is_dir():
            return False
        try:
            module = self.cache.open_installed(digest, self.credentials.publishers)
        except EdgepackError:
            return False
        if module is None:
            return False
        self.installed[digest] = module
        return True

    def renew_certificates(self, records: decide.Records, certificates_due: Callable[[str], bool]) -> None:
        """Renew, in the background, the certificates of TLS services that are due."""
        due = [
            (name, service.current)
            for name, service in records.agent.services.items()
            if service.current is not None
            and service.current.assignment.settings.tls is not None
            and certificates_due(name)
        ]
        if due:
            self.executor.renew_certificates(due)

    # --- the state file, the report, the cache -------------------------------------------------

    def save_state(self, records: decide.Records) -> decide.Records:
        """Write the agent's record with the download counters; the records as saved."""
        c = self.counters
        totals = DownloadTotals(manifests=c.manifests, blobs=c.blobs, bytes=c.bytes)
        records = replace(records, agent=records.agent.model_copy(update={"downloads": totals}))
        self.store.save(records.agent)
        return records

    def publish_report(self, records: decide.Records) -> None:
        desired = records.desired.modules if records.desired else []
        state = reported_state(
            records.agent,
            desired,
            alive={iid: h.alive for iid, h in records.health.items()},
            runtimes=sorted(self.runtimes),
            agent_version=self.agent_version,
            now=datetime.now(UTC),
            host=self.advertised,
        )
        self.publish_reported(encode_for_hub(state, hub_reads_newer=records.hub_reads_newer))

    def collect_garbage(self, records: decide.Records) -> None:
        in_flight = [op.assignment for op in records.ops.values() if op.assignment is not None]
        services = records.agent.services
        keep = kept(services, in_flight, records.retiring)
        collect(self.cache, self.installed, self.executor.runs, keep, services)

    def shutdown(self, records: decide.Records, *, stop_modules: bool) -> None:
        """Cancel the operations under way, and stop what serves if asked to."""
        for op in self.ops.values():
            op.control.cancel.set()
        for op in list(self.ops.values()):
            if op.thread is not None:
                op.thread.join(timeout=STOP_GRACE_S + DRAIN_S)
        self.prober.stop()
        if stop_modules:
            for name, service in records.agent.services.items():
                if service.current is not None:
                    log.info("stopping %s (--stop-modules)", name)
                    self.runtime_of(service.current).stop(service.current, grace_s=STOP_GRACE_S)
                if service.standby is not None:
                    self.runtime_of(service.standby).stop(service.standby, grace_s=STOP_GRACE_S)
        for _, instance in list(records.retiring.values()):
            self.runtime_of(instance).stop(instance, grace_s=STOP_GRACE_S)
