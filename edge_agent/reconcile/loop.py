"""The reconcile loop: one thread that owns the agent's state and reacts to events.

Everything that happens reaches the loop as an event on one queue: a desired state (MQTT or
HTTP), an operation that finished, a probe result, a log request, a timer. The loop updates
its records, asks the pure decisions what to do (:mod:`~edge_agent.reconcile.plan` for the
next operation, :mod:`~edge_agent.reconcile.supervise` for failures and restarts,
:mod:`~edge_agent.reconcile.steady` for a settled service's state), hands the effects to the
executor (:mod:`edge_agent.reconcile.executor`), saves its state and reports. It never blocks
on the network, a disk or a container: those are the executor's threads and they have
deadlines, so nothing can hold up the queue.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edge_agent.cache.modules import InstalledModule, ModuleCache
from edge_agent.download.module import Counters
from edge_agent.health import Prober, ProbeResult, Watched
from edge_agent.reconcile import step as decide
from edge_agent.reconcile.executor import (
    Event,
    Executor,
    OpDone,
    RunningOp,
    Stop,
)
from edge_agent.reconcile.garbage import collect, kept
from edge_agent.reconcile.logs import answer_log_request
from edge_agent.reconcile.operations import Control
from edge_agent.reconcile.plan import Op
from edge_agent.reconcile.step import DRAIN_S, STOP_GRACE_S, Health
from edge_agent.report.status import reported_state
from edge_agent.runtime.base import Runtime
from edge_agent.state.records import AgentRecord, DownloadTotals, InstanceRecord
from edge_agent.state.store import StateStore
from edge_agent.uplink.certificates import EndpointCertificates
from edge_agent.uplink.http import HubHttp
from edge_agent.uplink.mqtt import DesiredMessage, MqttEvent
from manifests.desired import (
    DesiredState,
    RuntimeKind,
)
from manifests.device import AgentConfig, DeviceCredentials
from manifests.errors import EdgepackError

log = logging.getLogger("edge_agent")

__all__ = ["Event", "ReconcileLoop", "Stop", "advertised_host"]

#: reports go out at most this often (the hub allows 120 a minute, bursts of 30)
REPORT_MIN_GAP_S = 0.5
#: how often TLS services' certificates are checked for renewal
CERT_CHECK_S = 6 * 3600.0


def advertised_host(config: AgentConfig) -> str:
    """The host a client uses to reach this device's modules."""
    if config.advertise_host:
        return config.advertise_host
    if config.service_host not in ("0.0.0.0", "::", ""):
        return f"[{config.service_host}]" if ":" in config.service_host else config.service_host
    return socket.gethostname()


@dataclass
class Timers:
    restart_at: dict[str, float] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)
    retry_attempts: dict[str, int] = field(default_factory=dict)
    unschedulable: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # key, why, until
    settle_at: dict[str, float] = field(default_factory=dict)  # when a standby may stop
    next_poll: float = 0.0
    poll_attempts: int = 0
    next_report: float = 0.0


class ReconcileLoop:
    def __init__(
        self,
        config: AgentConfig,
        credentials: DeviceCredentials,
        *,
        runtimes: Mapping[RuntimeKind, Runtime],
        hub: HubHttp,
        publish_reported: Callable[[bytes], None],
        publish_logs: Callable[[bytes], None],
        agent_version: str,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.device_id = credentials.device_id
        self.runtimes = dict(runtimes)
        self.hub = hub
        self.publish_reported = publish_reported
        self.publish_logs = publish_logs
        self.agent_version = agent_version
        self.clock = clock
        self.rand = rand
        self.store = StateStore(config.state_dir)
        self.cache = ModuleCache(config.state_dir / "cache")
        self.runs = config.state_dir / "run"
        self.events: queue.Queue[Event] = queue.Queue()
        self.record: AgentRecord = self.store.load(self.device_id)
        self.desired: DesiredState | None = None
        self.desired_bytes: bytes | None = None
        self.ops: dict[str, RunningOp] = {}
        self.health: dict[str, Health] = {}  # instance id -> health
        self.retiring: dict[str, tuple[str, InstanceRecord]] = {}  # instance id -> (service, instance)
        # Instances being killed because they stopped answering: until one is gone, the kernel
        # may still hand it connections of its port, so its service is not called Healthy.
        self.killing: set[str] = set()
        self.installed: dict[str, InstalledModule] = {}
        totals = self.record.downloads
        self.counters = Counters(manifests=totals.manifests, blobs=totals.blobs, bytes=totals.bytes)
        self.timers = Timers()
        self.etag: str | None = None
        self.prober = Prober(self.runtimes, self.events.put, clock=clock)
        self._op_ids = 0
        self._poll_in_flight = False
        self._dirty_plan = True
        self._dirty_report = True
        self._dirty_save = False
        self._gc_needed = True
        self._last_progress_report: dict[str, float] = {}
        self._stopping = False
        self._advertised = advertised_host(config)
        self.certificates = EndpointCertificates(
            hub, self.device_id, config.state_dir / "tls", [self._advertised, config.service_host]
        )
        self._last_report = float("-inf")
        self.executor = Executor(
            config,
            credentials,
            runtimes=self.runtimes,
            hub=hub,
            cache=self.cache,
            runs=self.runs,
            certificates=self.certificates,
            counters=self.counters,
            installed=self.installed,
            emit=self.events.put,
        )
        self._next_renewal_check = 0.0
        self._context = decide.Context(
            device_id=self.device_id,
            hub_trust=credentials.hub_trust(),
            restart=config.restart,
            poll_interval_s=config.poll_interval_s,
        )

    # --- public ------------------------------------------------------------------------------

    def submit(self, event: Event) -> None:
        """Hand an event to the loop (any thread)."""
        self.events.put(event)

    def on_mqtt(self, event: MqttEvent) -> None:
        self.events.put(event)

    def watched(self) -> list[Watched]:
        """The serving instances (for the telemetry thread); a snapshot."""
        return [
            Watched(name, rec.current)
            for name, rec in list(self.record.services.items())
            if rec.current is not None and self.health.get(rec.current.id, Health()).alive
        ]

    def boot(self) -> None:
        """Restore what was running from disk alone: no hub and no broker needed."""
        self.runs.mkdir(parents=True, exist_ok=True)
        self._restore_desired()
        for name, service in self.record.services.items():
            current = service.current
            standby = service.standby
            if standby is not None:
                runtime = self.runtimes.get(standby.runtime)
                if runtime is not None and runtime.liveness(standby).alive:
                    self.health[standby.id] = Health(alive=True)
                    self.timers.settle_at[name] = self.clock() + self.config.restart.settle_s
                else:
                    service.standby = None
            if current is None:
                continue
            runtime = self.runtimes.get(current.runtime)
            alive = runtime is not None and runtime.liveness(current).alive
            self.health[current.id] = Health(alive=alive)
            if alive:
                # Its state stays what it was: the first probe confirms or changes it.
                log.info("adopted %s version %s (instance %s)", name, current.version, current.id)
            else:
                log.info("%s version %s is not running; starting it from the cache", name, current.version)
                self.timers.restart_at[name] = self.clock()
        known = {i.id for s in self.record.services.values() for i in (s.current, s.standby) if i is not None}
        for runtime in self.runtimes.values():
            for orphan in runtime.reap_orphans(known):
                log.warning("stopped instance %s that no record names", orphan)
        self._watch()
        self.prober.start()

    def run(self) -> None:
        """Process events until :class:`Stop` arrives."""
        while not self._stopping:
            timeout = max(0.0, min(self._next_timer() - self.clock(), 1.0))
            try:
                event: Event | None = self.events.get(timeout=timeout)
            except queue.Empty:
                event = None
            while event is not None:
                try:
                    self._handle(event)
                except Exception:
                    # One event that cannot be handled (a bug, a full disk) must not end the
                    # agent: its modules keep being supervised, and the log says what failed.
                    log.exception("handling %s failed", type(event).__name__)
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    event = None
            self.step()

    def step(self) -> None:
        """Timers, planning, saving and reporting after a batch of events."""
        for name, phase in (
            ("timers", self._timers),
            ("planning", self._plan_if_needed),
            ("garbage collection", self._gc_if_idle),
            ("saving the state", self._save_if_needed),
            ("reporting", self._report_if_needed),
        ):
            try:
                phase()
            except Exception as exc:
                log.exception("%s failed", name)
                self.record.last_error = f"{name} failed: {type(exc).__name__}: {exc}"[:2000]

    def _plan_if_needed(self) -> None:
        if self._dirty_plan:
            self._dirty_plan = False
            self._replan()

    def _gc_if_idle(self) -> None:
        if self._gc_needed and not any(op.kind is Op.FETCH for op in self.ops.values()):
            self._gc_needed = False
            self._gc()

    def _save_if_needed(self) -> None:
        if self._dirty_save:
            self._save()  # raises on a full disk: stays dirty, tried again on the next step
            self._dirty_save = False

    def _report_if_needed(self) -> None:
        # At most one report per REPORT_MIN_GAP_S (the hub budgets each device's reports);
        # the newest state goes out when the gap is over.
        if self._dirty_report and self.clock() - self._last_report >= REPORT_MIN_GAP_S:
            self._dirty_report = False
            self._last_report = self.clock()
            self._report()

    def _renew_certificates(self) -> None:
        """Renew, in the background, the certificates of TLS services that are due."""
        due = [
            (name, service.current)
            for name, service in self.record.services.items()
            if service.current is not None
            and service.current.assignment.settings.tls is not None
            and self.certificates.due(name)
        ]
        if due:
            self.executor.renew_certificates(due)

    def shutdown(self, *, stop_modules: bool) -> None:
        for op in self.ops.values():
            op.control.cancel.set()
        for op in list(self.ops.values()):
            if op.thread is not None:
                op.thread.join(timeout=STOP_GRACE_S + DRAIN_S)
        self.prober.stop()
        if stop_modules:
            for name, service in self.record.services.items():
                if service.current is not None:
                    log.info("stopping %s (--stop-modules)", name)
                    self._runtime_of(service.current).stop(service.current, grace_s=STOP_GRACE_S)
                if service.standby is not None:
                    self._runtime_of(service.standby).stop(service.standby, grace_s=STOP_GRACE_S)
        for _, instance in list(self.retiring.values()):
            self._runtime_of(instance).stop(instance, grace_s=STOP_GRACE_S)
        self._save()
        self.hub.close()

    # --- events ------------------------------------------------------------------------------

    def _handle(self, event: Event | decide.SettleDue) -> None:
        """One event through the pure step: look up what it needs, keep the new records,
        carry out the effects."""
        before = self._records()
        records, effects = decide.step(
            before,
            event,
            ctx=self._context,
            now=self.clock(),
            wall=datetime.now(UTC),
            rand=self.rand(),
            looked=self._look_up(before, event),
        )
        for effect in effects:
            if isinstance(effect, decide.SaveDesired):
                self.store.save_desired(effect.payload)  # saved before anything is done by it
        self._keep(records)
        self._effects(effects)

    def _on_desired(self, payload: bytes, source: str) -> None:
        self._handle(DesiredMessage(payload, source))

    def _look_up(self, records: decide.Records, event: Event | decide.SettleDue) -> decide.Looked:
        """What the step needs to know of the runtimes for ``event``: the last log lines of an
        instance that exited, whether the standby still runs when the new version failed."""
        match event:
            case ProbeResult(service=name, instance_id=instance_id, alive=alive, healthy=healthy):
                service = records.agent.services.get(name)
                if service is None or service.current is None or service.current.id != instance_id:
                    return decide.Looked()
                lines: list[str] = []
                if not alive and records.health.get(instance_id, Health()).alive:
                    lines = self._runtime_of(service.current).log_tail(service.current, 30)
                failing = not alive or not healthy
                return decide.Looked(tuple(lines), failing and self._standby_alive(records, name))
            case OpDone(service=name, error=error):
                running = self.ops.get(name)
                crashed = error is not None and running is not None and running.kind in (Op.START, Op.REPLACE)
                return decide.Looked(standby_alive=crashed and self._standby_alive(records, name))
        return decide.Looked()

    def _standby_alive(self, records: decide.Records, name: str) -> bool:
        service = records.agent.services.get(name)
        standby = service.standby if service is not None else None
        return (
            standby is not None
            and records.health.get(standby.id, Health()).alive
            and self._runtime_of(standby).liveness(standby).alive
        )

    def _records(self) -> decide.Records:
        """The loop's records, frozen, for one step."""
        return decide.Records(
            agent=self.record,
            desired=self.desired,
            payload=self.desired_bytes,
            health=dict(self.health),
            ops={
                name: decide.OpView(op.id, op.kind, op.key, op.assignment, op.restart)
                for name, op in self.ops.items()
            },
            retiring=dict(self.retiring),
            killing=frozenset(self.killing),
            restart_at=dict(self.timers.restart_at),
            retry_at=dict(self.timers.retry_at),
            retry_attempts=dict(self.timers.retry_attempts),
            unschedulable=dict(self.timers.unschedulable),
            settle_at=dict(self.timers.settle_at),
            next_poll=self.timers.next_poll,
            poll_attempts=self.timers.poll_attempts,
            poll_in_flight=self._poll_in_flight,
            etag=self.etag,
            progress_reported=dict(self._last_progress_report),
            next_op_id=self._op_ids,
        )

    def _keep(self, records: decide.Records) -> None:
        """Take the records a step returned as the loop's own."""
        self.record, self.desired, self.desired_bytes = records.agent, records.desired, records.payload
        self.health = dict(records.health)
        for name in [name for name in self.ops if name not in records.ops]:
            del self.ops[name]
        self.retiring = dict(records.retiring)
        self.killing = set(records.killing)
        self.timers.restart_at = dict(records.restart_at)
        self.timers.retry_at = dict(records.retry_at)
        self.timers.retry_attempts = dict(records.retry_attempts)
        self.timers.unschedulable = dict(records.unschedulable)
        self.timers.settle_at = dict(records.settle_at)
        self.timers.next_poll, self.timers.poll_attempts = records.next_poll, records.poll_attempts
        self._poll_in_flight, self.etag = records.poll_in_flight, records.etag
        self._last_progress_report = dict(records.progress_reported)
        self._op_ids = records.next_op_id

    # --- planning ----------------------------------------------------------------------------

    def _replan(self) -> None:
        modules = self.desired.modules if self.desired is not None else []
        cached = {a.manifest_digest: self._cached(a.manifest_digest) for a in modules}
        records, effects = decide.replan(
            self._records(),
            cached=cached,
            runtimes=frozenset(self.runtimes),
            now=self.clock(),
            wall=datetime.now(UTC),
        )
        self._keep(records)
        self._effects(effects)

    def _effects(self, effects: tuple[decide.Action, ...]) -> None:
        """Carry out what a step asked for (its records are kept already; a desired state's
        bytes are saved already)."""
        for effect in effects:
            match effect:
                case decide.Dirty(save=save, report=report, plan=plan_again):
                    self._dirty_save |= save
                    self._dirty_report |= report
                    self._dirty_plan |= plan_again
                case decide.Retire(service=name, instance=instance, grace_s=grace_s):
                    self.executor.retire(name, instance, grace_s=grace_s)
                case decide.Watch():
                    self._watch()
                case decide.Say(level=level, text=text, error=error):
                    log.log(level, "%s", text, exc_info=error)
                case decide.Forget(service=name):
                    self._watch()
                    self._gc_needed = True
                    log.info("%s removed", name)
                case decide.Installed(module=module):
                    self.installed[module.manifest_digest] = module
                case decide.Collect():
                    self._gc_needed = True
                case decide.RotateKeys(instance=instance, auth=auth):
                    self._runtime_of(instance).update_endpoint(instance, auth, None)
                case decide.AnswerLogs(payload=payload):
                    self._on_log_request(payload)
                case decide.Halt():
                    self._stopping = True
                case decide.Dispatch(service=name, op=op, replaces=replaces, stops=stops):
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
                case decide.Cancel(service=name):
                    running_op = self.ops.get(name)
                    if running_op is not None and not running_op.control.cancel.is_set():
                        log.info("%s: cancelling %s (the desired state moved on)", name, running_op.kind)
                        running_op.control.cancel.set()
                case decide.SaveDesired():
                    pass

    # --- logs --------------------------------------------------------------------------------

    def _on_log_request(self, payload: bytes) -> None:
        def serving(name: str) -> InstanceRecord | None:
            service = self.record.services.get(name)
            return service.current if service else None

        answer_log_request(
            payload,
            device_id=self.device_id,
            serving=serving,
            runtime_of=self._runtime_of,
            publish=self.publish_logs,
        )

    # --- timers ------------------------------------------------------------------------------

    def _next_timer(self) -> float:
        candidates = [self.timers.next_report, self.timers.next_poll]
        if self._dirty_report:
            candidates.append(self._last_report + REPORT_MIN_GAP_S)
        candidates += self.timers.restart_at.values()
        candidates += self.timers.retry_at.values()
        candidates += (until for _, _, until in self.timers.unschedulable.values())
        candidates += self.timers.settle_at.values()
        return min(candidates) if candidates else self.clock() + 1.0

    def _timers(self) -> None:
        now = self.clock()
        if any(now >= t for t in self.timers.restart_at.values()):
            self._dirty_plan = True
        for name, at in list(self.timers.retry_at.items()):
            if now >= at:
                del self.timers.retry_at[name]
                self._dirty_plan = True
        for name, at in list(self.timers.settle_at.items()):
            if now >= at:
                del self.timers.settle_at[name]
                self._handle(decide.SettleDue(name))
        for name, (_, _, until) in list(self.timers.unschedulable.items()):
            if now >= until:
                del self.timers.unschedulable[name]
                self._dirty_plan = True
        if now >= self.timers.next_poll and not self._poll_in_flight:
            self._poll_in_flight = True
            self.timers.next_poll = now + self.config.poll_interval_s
            self.executor.poll(self.etag)
        if now >= self.timers.next_report:
            self._dirty_report = True
        if now >= self._next_renewal_check:
            self._next_renewal_check = now + CERT_CHECK_S
            self._renew_certificates()

    # --- records, reports, garbage -------------------------------------------------------------

    def _save(self) -> None:
        c = self.counters
        self.record.downloads = DownloadTotals(manifests=c.manifests, blobs=c.blobs, bytes=c.bytes)
        self.store.save(self.record)

    def _runtime_of(self, instance: InstanceRecord) -> Runtime:
        return self.runtimes[instance.runtime]

    def _watch(self) -> None:
        self.prober.watch(
            [
                Watched(name, service.current)
                for name, service in self.record.services.items()
                if service.current is not None
            ]
        )

    def _cached(self, digest: str) -> bool:
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

    def _report(self) -> None:
        self.timers.next_report = self.clock() + self.config.report_interval_s
        desired = self.desired.modules if self.desired else []
        alive = {iid: h.alive for iid, h in self.health.items()}
        state = reported_state(
            self.record,
            desired,
            alive=alive,
            runtimes=sorted(self.runtimes),
            agent_version=self.agent_version,
            now=datetime.now(UTC),
            host=self._advertised,
        )
        self.publish_reported(state.model_dump_json(by_alias=True).encode())

    def _gc(self) -> None:
        in_flight = [op.assignment for op in self.ops.values() if op.assignment is not None]
        keep = kept(self.record.services, in_flight, self.retiring)
        collect(self.cache, self.installed, self.runs, keep, self.record.services)

    # --- boot ----------------------------------------------------------------------------------

    def _restore_desired(self) -> None:
        data = self.store.load_desired()
        if data is not None:
            records, effects = decide.restore(
                self._records(), data, ctx=self._context, wall=datetime.now(UTC)
            )
            self._keep(records)
            self._effects(effects)
