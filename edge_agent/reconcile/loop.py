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

import json
import logging
import queue
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edge_agent.backoff import full_jitter
from edge_agent.cache.modules import InstalledModule, ModuleCache
from edge_agent.download.module import Counters
from edge_agent.health import Prober, ProbeResult, Watched
from edge_agent.reconcile import step as decide
from edge_agent.reconcile.executor import (
    Event,
    Executor,
    HttpDesired,
    OpDone,
    OpProgress,
    Retired,
    RunningOp,
    Stop,
)
from edge_agent.reconcile.garbage import collect, kept
from edge_agent.reconcile.logs import answer_log_request
from edge_agent.reconcile.operations import Control
from edge_agent.reconcile.plan import Observed, Op, Verdict, Wanted, assignment_key, plan
from edge_agent.reconcile.step import DRAIN_S, STOP_GRACE_S, Health
from edge_agent.report.status import reported_state
from edge_agent.runtime.base import Runtime
from edge_agent.state.records import AgentRecord, DownloadTotals, InstanceRecord, ServiceRecord
from edge_agent.state.store import StateStore
from edge_agent.uplink.certificates import EndpointCertificates
from edge_agent.uplink.http import HubHttp
from edge_agent.uplink.mqtt import Connected, DesiredMessage, Disconnected, LogRequestMessage, MqttEvent
from manifests.desired import (
    DesiredState,
    DesiredStateRefused,
    ModuleAssignment,
    RuntimeKind,
    verify_desired,
)
from manifests.device import AgentConfig, DeviceCredentials
from manifests.errors import EdgepackError
from manifests.states import ServiceState

log = logging.getLogger("edge_agent")

__all__ = ["Event", "ReconcileLoop", "Stop", "advertised_host"]

PROGRESS_REPORT_EVERY_S = 2.0
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

    def _handle(self, event: Event) -> None:
        match event:
            case DesiredMessage(payload=payload, source=source):
                self._on_desired(payload, source)
            case Connected():
                self.timers.next_poll = self.clock()  # a missed retained message must not matter
                self._dirty_report = True
            case Disconnected():
                pass
            case HttpDesired():
                self._on_http(event)
            case OpDone():
                self._on_op_done(event)
            case OpProgress():
                self._on_progress(event)
            case ProbeResult():
                self._on_probe(event)
            case LogRequestMessage(payload=payload):
                self._on_log_request(payload)
            case Retired(instance_id=instance_id):
                retired = self.retiring.pop(instance_id, None)
                self.health.pop(instance_id, None)
                self._gc_needed = True
                if instance_id in self.killing:
                    self.killing.discard(instance_id)
                    if retired is not None:
                        self._settle(retired[0])
            case Stop():
                self._stopping = True

    def _on_desired(self, payload: bytes, source: str) -> None:
        before = decide.Applied(
            self.record, self.desired, self.desired_bytes, self.timers.retry_at, self.timers.retry_attempts
        )
        out = decide.on_desired(
            before,
            payload,
            source,
            hub_trust=self.credentials.hub_trust(),
            device_id=self.device_id,
            wall=datetime.now(UTC),
        )
        for effect in out.effects:
            if isinstance(effect, decide.SaveDesired):
                self.store.save_desired(effect.payload)  # saved before anything is done by it
        applied = out.applied
        self.record, self.desired, self.desired_bytes = applied.record, applied.desired, applied.payload
        self.timers.retry_at, self.timers.retry_attempts = (
            dict(applied.retry_at),
            dict(applied.retry_attempts),
        )
        self._effects(out.effects)

    def _on_http(self, event: HttpDesired) -> None:
        self._poll_in_flight = False
        if event.error is not None:
            delay = full_jitter(self.timers.poll_attempts, self.rand(), cap_s=60.0)
            self.timers.poll_attempts += 1
            self.timers.next_poll = self.clock() + min(delay, self.config.poll_interval_s)
            log.info("desired state over HTTP: %s; retrying in %.1fs", event.error, delay)
            return
        self.timers.poll_attempts = 0
        self.timers.next_poll = self.clock() + self.config.poll_interval_s
        fetch = event.fetch
        if fetch is None:
            return
        self.etag = fetch.etag
        if fetch.data is not None:
            self._on_desired(fetch.data, "http")

    def _on_progress(self, event: OpProgress) -> None:
        op = self.ops.get(event.service)
        if op is None or op.id != event.op_id:
            return
        service = self._service(event.service)
        service.progress = event.progress
        now = self.clock()
        if now - self._last_progress_report.get(event.service, 0.0) >= PROGRESS_REPORT_EVERY_S:
            self._last_progress_report[event.service] = now
            self._dirty_report = True

    # --- planning ----------------------------------------------------------------------------

    def _wanted(self) -> dict[str, Wanted]:
        out: dict[str, Wanted] = {}
        if self.desired is None:
            return out
        now = self.clock()
        for a in self.desired.modules:
            key = assignment_key(a)
            why: str | None = None
            if a.settings.runtime is not None and a.settings.runtime not in self.runtimes:
                enabled = ", ".join(sorted(self.runtimes)) or "none"
                why = (
                    f"runtime {a.settings.runtime} is not enabled on this device (enabled: {enabled}); "
                    "enable it in agent.toml or deploy the service with another runtime"
                )
            else:
                memo = self.timers.unschedulable.get(a.service)
                if memo is not None and memo[0] == key and now < memo[2]:
                    why = memo[1]
            out[a.service] = Wanted(a, key, self._cached(a.manifest_digest), why)
        return out

    def _observed(self) -> dict[str, Observed]:
        now = self.clock()
        out: dict[str, Observed] = {}
        for name, service in self.record.services.items():
            current = service.current
            op = self.ops.get(name)
            restart_at = self.timers.restart_at.get(name)
            fallback = next(
                (a for a in (service.last_good, service.previous)
                 if a is not None and assignment_key(a) not in service.failed),
                None,
            )  # fmt: skip
            out[name] = Observed(
                running_key=current.key if current else None,
                running_alive=current is not None and self.health.get(current.id, Health()).alive,
                fallback=fallback,
                op=op.kind if op else None,
                op_key=op.key if op else None,
                failed_keys=frozenset(service.failed),
                restart_due=restart_at is not None and now >= restart_at,
            )
        return out

    def _replan(self) -> None:
        now = self.clock()
        for action in plan(self._wanted(), self._observed()):
            name = action.service
            match action.verdict:
                case Verdict.RUN:
                    if now < self.timers.retry_at.get(name, 0.0):
                        continue  # backing off after a temporary failure
                    assert action.op is not None
                    self._dispatch(name, action.op, action.assignment)
                case Verdict.CANCEL:
                    op = self.ops[name]
                    if not op.control.cancel.is_set():
                        log.info("%s: cancelling %s (the desired state moved on)", name, op.kind)
                        op.control.cancel.set()
                case Verdict.REFUSE:
                    why = self._serving_note(name, action.reason)
                    self._set_status(name, ServiceState.UNSCHEDULABLE, why)
                case Verdict.KEEP | Verdict.WAIT:
                    service = self.record.services.get(name)
                    desired = self.desired.modules if self.desired is not None else []
                    wanted = any(m.service == name for m in desired)
                    idle = service is not None and service.current is None and name not in self.ops
                    if idle and not wanted:
                        self._forget(name)

    def _dispatch(self, name: str, op: Op, assignment: ModuleAssignment | None) -> None:
        service = self._service(name)
        restart = False
        if op in (Op.START, Op.REPLACE) and assignment is not None:
            restart = service.current is not None and service.current.key == assignment_key(assignment)
            self.timers.restart_at.pop(name, None)
        self._op_ids += 1
        deadline = self.clock() + self.executor.deadline_of(op, assignment)
        running = RunningOp(
            id=self._op_ids,
            kind=op,
            key=assignment_key(assignment) if assignment else None,
            assignment=assignment,
            control=Control(deadline=deadline),
            restart=restart,
            replaces=service.current if op is Op.REPLACE else None,
        )
        target = f"version {assignment.version}" if assignment else ""
        match op:
            case Op.FETCH:
                self._set_status(name, ServiceState.TRANSITIONING, f"downloading {target}")
            case Op.START:
                what = "restarting" if restart else "starting"
                self._set_status(name, ServiceState.TRANSITIONING, f"{what} {target}", keep_failed=True)
            case Op.REPLACE:
                old = service.current
                if restart:
                    text = f"restarting {target} beside the running instance"
                else:
                    serving = old.version if old else "?"
                    text = f"starting {target} beside version {serving}, which keeps serving"
                self._set_status(name, ServiceState.TRANSITIONING, text, keep_failed=True)
            case Op.STOP:
                running.stops = tuple(i for i in (service.current, service.standby) if i is not None)
        self.ops[name] = running
        self.executor.run(name, running)

    # --- operation results (loop thread) ------------------------------------------------------

    def _on_op_done(self, event: OpDone) -> None:
        running = self.ops.get(event.service)
        if running is None or running.id != event.op_id:
            return
        del self.ops[event.service]
        done = decide.Finished(
            kind=running.kind,
            key=running.key,
            assignment=running.assignment,
            restart=running.restart,
            error=event.error,
            result=event.result,
        )
        crashed = event.error is not None and running.kind in (Op.START, Op.REPLACE)
        slot = self._slot(event.service, standby_check=crashed)
        outcome = decide.on_op_done(
            slot,
            done,
            restart=self.config.restart,
            now=self.clock(),
            wall=datetime.now(UTC),
            rand=self.rand(),
        )
        self._apply(event.service, slot, outcome)

    def _end_settle(self, name: str) -> None:
        """The new version has been healthy for the settle time: the standby drains and stops."""
        service = self.record.services.get(name)
        if service is None or service.standby is None or service.current is None:
            return
        health = self.health.get(service.current.id, Health())
        since = service.healthy_since
        healthy_for = (datetime.now(UTC) - since).total_seconds() if since is not None else 0.0
        settle_s = self.config.restart.settle_s
        if not health.alive or health.misses or healthy_for < settle_s:
            # Not settled yet (a probe missed since): look again once it may have. A crash
            # restarts it, and the start arms the timer anew.
            if health.alive:
                self.timers.settle_at[name] = self.clock() + max(settle_s - healthy_for, 1.0)
            return
        standby, service.standby = service.standby, None
        log.info("%s: version %s settled; stopping version %s",
                 name, service.current.version, standby.version)  # fmt: skip
        self._retire(name, standby, grace_s=STOP_GRACE_S + DRAIN_S)
        self._dirty_save = True

    def _serving_note(self, name: str, reason: str | None) -> str | None:
        """``reason``, saying which version serves meanwhile when it is not the target."""
        if name not in self.record.services:
            return reason
        return decide.serving_note(self._slot(name), reason)

    def _killing_for(self, name: str) -> bool:
        return any(self.retiring[iid][0] == name for iid in self.killing if iid in self.retiring)

    def _settle(self, name: str) -> None:
        """The steady state of a service that no operation holds (after its last change)."""
        if name in self.record.services:
            slot = self._slot(name)
            self._apply(name, slot, decide.settle(slot, datetime.now(UTC)))

    # --- health ------------------------------------------------------------------------------

    def _on_probe(self, result: ProbeResult) -> None:
        service = self.record.services.get(result.service)
        if service is None or service.current is None or service.current.id != result.instance_id:
            return
        health = self.health.setdefault(result.instance_id, Health())
        failing = not result.alive or not result.healthy
        lines: list[str] = []
        if not result.alive and health.alive:
            lines = self._runtime_of(service.current).log_tail(service.current, 30)
        slot = self._slot(result.service, standby_check=failing)
        self._apply(
            result.service,
            slot,
            decide.on_probe(
                slot,
                result,
                log_lines=lines,
                restart=self.config.restart,
                now=self.clock(),
                wall=datetime.now(UTC),
                rand=self.rand(),
            ),
        )

    def _slot(self, name: str, *, standby_check: bool = False) -> decide.Slot:
        """What the pure decisions see of service ``name`` (``standby_check``: ask the runtime
        whether the standby still runs, for a decision that may hand back to it)."""
        service = self._service(name)
        current, standby = service.current, service.standby
        standby_alive = (
            standby_check
            and standby is not None
            and self.health.get(standby.id, Health()).alive
            and self._runtime_of(standby).liveness(standby).alive
        )
        return decide.Slot(
            service=service,
            health=self.health.get(current.id, Health()) if current is not None else Health(),
            standby_alive=standby_alive,
            restart_at=self.timers.restart_at.get(name),
            settle_at=self.timers.settle_at.get(name),
            busy=name in self.ops,
            killing=self._killing_for(name),
            retry_at=self.timers.retry_at.get(name),
            retry_attempts=self.timers.retry_attempts.get(name, 0),
            unschedulable=self.timers.unschedulable.get(name),
        )

    def _apply(self, name: str, before: decide.Slot, outcome: decide.Outcome) -> None:
        """Keep what a decision returned and carry out its effects."""
        slot = outcome.slot
        self.record.services[name] = slot.service
        current = slot.service.current
        if current is not None and (
            current.id in self.health
            or slot.health != before.health
            or before.service.current is None
            or before.service.current.id != current.id
        ):
            self.health[current.id] = slot.health
        timers: tuple[tuple[dict[str, Any], Any], ...] = (
            (self.timers.restart_at, slot.restart_at),
            (self.timers.settle_at, slot.settle_at),
            (self.timers.retry_at, slot.retry_at),
            (self.timers.retry_attempts, slot.retry_attempts or None),
            (self.timers.unschedulable, slot.unschedulable),
        )
        for timer, value in timers:
            if value is None:
                timer.pop(name, None)
            else:
                timer[name] = value
        self._effects(outcome.effects)

    def _effects(self, effects: tuple[decide.Effect, ...]) -> None:
        """Carry out what the decisions asked for (a saved desired state is saved already)."""
        for effect in effects:
            match effect:
                case decide.Dirty(save=save, report=report, plan=plan_again):
                    self._dirty_save |= save
                    self._dirty_report |= report
                    self._dirty_plan |= plan_again
                case decide.Retire(service=name, instance=instance, grace_s=grace_s, kill=kill):
                    if kill:
                        self.killing.add(instance.id)
                    self._retire(name, instance, grace_s=grace_s)
                case decide.Watch():
                    self._watch()
                case decide.Say(level=level, text=text, error=error):
                    log.log(level, "%s", text, exc_info=error)
                case decide.Forget(service=name):
                    self._forget(name)
                case decide.Installed(module=module):
                    self.installed[module.manifest_digest] = module
                case decide.Collect():
                    self._gc_needed = True
                case decide.RotateKeys(instance=instance, auth=auth):
                    self._runtime_of(instance).update_endpoint(instance, auth, None)
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
                self._end_settle(name)
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

    def _service(self, name: str) -> ServiceRecord:
        service = self.record.services.get(name)
        if service is None:
            service = ServiceRecord(name=name, since=datetime.now(UTC))
            self.record.services[name] = service
        return service

    def _set_status(
        self, name: str, state: ServiceState, reason: str | None, *, keep_failed: bool = False
    ) -> None:
        service = self._service(name)
        if keep_failed and service.state is ServiceState.FAILED and service.target is not None:
            target_key = assignment_key(service.target)
            if target_key in service.failed:
                return  # a rollback restart must not hide why the wanted version failed
        if service.state is not state:
            service.since = datetime.now(UTC)
            log.info("%s is %s%s", name, state.value, f": {reason}" if reason else "")
        service.state = state
        service.reason = reason
        self._dirty_save = self._dirty_report = True

    def _forget(self, name: str) -> None:
        service = self.record.services.pop(name, None)
        self.timers.restart_at.pop(name, None)
        self.timers.retry_at.pop(name, None)
        self.timers.unschedulable.pop(name, None)
        self.timers.settle_at.pop(name, None)
        if service is not None and service.current is not None:
            self.health.pop(service.current.id, None)
        self._watch()
        self._gc_needed = True
        log.info("%s removed", name)

    def _retire(self, name: str, instance: InstanceRecord, *, grace_s: float) -> None:
        """Stop an instance that no longer serves (it drains first), in the background."""
        self.retiring[instance.id] = (name, instance)
        self.health.pop(instance.id, None)

        self.executor.retire(name, instance, grace_s=grace_s)

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
        """The last verified desired state, checked again (signature, device) as of when it was
        applied: after a reboot an expired state still says what to run until the hub speaks."""
        data = self.store.load_desired()
        if data is None:
            return
        try:
            signed = json.loads(data)["signed"]
            generation = int(signed["generation"])
            applied_at = self.record.applied_at or datetime.fromisoformat(signed["issued"])
        except (ValueError, KeyError, TypeError):
            log.error("the saved desired state is damaged; waiting for the hub")
            return
        try:
            # The desired file is written before the state file: a crash in between leaves a
            # newer desired state, which was verified before it was written.
            state = verify_desired(
                data,
                hub_trust=self.credentials.hub_trust(),
                device_id=self.device_id,
                applied_generation=min(generation, max(self.record.applied_generation, 1)) - 1,
                now=applied_at,
            )
        except DesiredStateRefused as exc:
            log.error("the saved desired state no longer verifies (%s); waiting for the hub", exc)
            return
        if state.generation < self.record.applied_generation:
            log.error(
                "the saved desired state is generation %d, older than the applied %d; waiting for the hub",
                state.generation,
                self.record.applied_generation,
            )
            return
        self.record.applied_generation = state.generation
        self.record.applied_at = applied_at
        self.desired, self.desired_bytes = state, data
        for assignment in state.modules:
            self._service(assignment.service).target = assignment
