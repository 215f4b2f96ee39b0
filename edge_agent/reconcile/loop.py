"""The reconcile loop: one thread that owns the agent's state and reacts to events.

Everything that happens reaches the loop as an event on one queue: a desired state (MQTT or
HTTP), an operation that finished, a probe result, a log request, a timer. The loop holds the
frozen records, looks up what an event needs, asks the pure step what it does
(:mod:`~edge_agent.reconcile.step`), keeps the records it returns and hands its effects to
:mod:`~edge_agent.reconcile.actions`, which carries them out (operations through the executor,
:mod:`~edge_agent.reconcile.executor`), saves the state and reports. It never blocks on the
network or a container: those are the executor's threads and they have deadlines, so nothing
can hold up the queue.
"""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime

from edge_agent.cache.modules import InstalledModule, ModuleCache
from edge_agent.download.module import Counters
from edge_agent.health import Prober, ProbeResult, Watched
from edge_agent.reconcile import step as decide
from edge_agent.reconcile.actions import Actions, advertised_host
from edge_agent.reconcile.executor import Event, Executor, OpDone, Stop
from edge_agent.reconcile.operations import FAILURE_LOG_LINES
from edge_agent.reconcile.plan import Op
from edge_agent.reconcile.step import Health
from edge_agent.runtime.base import Runtime
from edge_agent.state.records import AgentRecord, InstanceRecord
from edge_agent.state.store import StateStore
from edge_agent.uplink.certificates import EndpointCertificates
from edge_agent.uplink.http import HubHttp
from edge_agent.uplink.mqtt import MqttEvent
from manifests.desired import RuntimeKind
from manifests.device import AgentConfig, DeviceCredentials

log = logging.getLogger("edge_agent")

__all__ = ["Event", "ReconcileLoop", "Stop", "advertised_host"]

#: reports go out at most this often (the hub allows 120 a minute, bursts of 30)
REPORT_MIN_GAP_S = 0.5
#: how often TLS services' certificates are checked for renewal
CERT_CHECK_S = 6 * 3600.0


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
        alive: Callable[[], None] = lambda: None,
        settled: Callable[[], object] = lambda: None,
    ) -> None:
        self.config = config
        #: called after every turn of :meth:`run` (the service manager's watchdog)
        self.alive = alive
        #: called once each time the last operation has ended (the daemon trims its heap then)
        self.settled = settled
        self._busy = True  # the start (imports, the cache read) is work to settle too
        self.device_id = credentials.device_id
        self.runtimes = dict(runtimes)
        self.hub = hub
        self.clock = clock
        self.rand = rand
        self.store = StateStore(config.state_dir)
        self.runs = config.state_dir / "run"
        self.events: queue.Queue[Event] = queue.Queue()
        #: everything the decisions read and change; only this thread replaces it
        self.records = decide.Records(agent=self.store.load(self.device_id))
        totals = self.records.agent.downloads
        counters = Counters(manifests=totals.manifests, blobs=totals.blobs, bytes=totals.bytes)
        self.prober = Prober(self.runtimes, self.events.put, clock=clock)
        installed: dict[str, InstalledModule] = {}
        cache = ModuleCache(config.state_dir / "cache")
        advertised = advertised_host(config)
        self.certificates = EndpointCertificates(
            hub, self.device_id, config.state_dir / "tls", [advertised, config.service_host]
        )
        executor = Executor(
            config,
            credentials,
            runtimes=self.runtimes,
            hub=hub,
            cache=cache,
            runs=self.runs,
            certificates=self.certificates,
            counters=counters,
            installed=installed,
            emit=self.events.put,
        )
        self.executor = executor
        self.actions = Actions(
            config,
            credentials,
            runtimes=self.runtimes,
            store=self.store,
            cache=cache,
            executor=executor,
            installed=installed,
            counters=counters,
            prober=self.prober,
            publish_reported=publish_reported,
            publish_logs=publish_logs,
            agent_version=agent_version,
            clock=clock,
        )
        self.next_report = 0.0
        self._last_report = float("-inf")
        self._next_renewal_check = 0.0
        self._context = decide.Context(
            device_id=self.device_id,
            hub_trust=credentials.hub_trust(),
            restart=config.restart,
            poll_interval_s=config.poll_interval_s,
        )

    # --- public ------------------------------------------------------------------------------

    @property
    def record(self) -> AgentRecord:
        """The agent's persisted record, as of the last step."""
        return self.records.agent

    def submit(self, event: Event) -> None:
        """Hand an event to the loop (any thread)."""
        self.events.put(event)

    def on_mqtt(self, event: MqttEvent) -> None:
        self.events.put(event)

    def watched(self) -> list[Watched]:
        """The serving instances (for the telemetry thread); a snapshot."""
        records = self.records
        return [
            Watched(name, rec.current)
            for name, rec in list(records.agent.services.items())
            if rec.current is not None and records.health.get(rec.current.id, Health()).alive
        ]

    def hub_reads_newer(self) -> bool:
        """Whether the applied desired state's hub reads this agent's newer fields (for the
        telemetry thread)."""
        return self.records.hub_reads_newer

    def boot(self) -> None:
        """Restore what was running from disk alone: no hub and no broker needed."""
        self.runs.mkdir(parents=True, exist_ok=True)
        data = self.store.load_desired()
        if data is not None:
            self._apply(decide.restore(self.records, data, ctx=self._context, wall=datetime.now(UTC)))
        health, settle_at, restart_at = dict(self.records.health), {}, {}
        for name, service in self.records.agent.services.items():
            current, standby = service.current, service.standby
            if standby is not None:
                runtime = self.runtimes.get(standby.runtime)
                if runtime is not None and runtime.liveness(standby).alive:
                    health[standby.id] = Health(alive=True)
                    settle_at[name] = self.clock() + self.config.restart.settle_s
                else:
                    service.standby = None
            if current is None:
                continue
            runtime = self.runtimes.get(current.runtime)
            alive = runtime is not None and runtime.liveness(current).alive
            health[current.id] = Health(alive=alive)
            if alive:
                # Its state stays what it was: the first probe confirms or changes it.
                log.info("adopted %s version %s (instance %s)", name, current.version, current.id)
            else:
                log.info("%s version %s is not running; starting it from the cache", name, current.version)
                restart_at[name] = self.clock()
        self.records = replace(self.records, health=health, settle_at=settle_at, restart_at=restart_at)
        services = self.records.agent.services.values()
        known = {i.id for s in services for i in (s.current, s.standby) if i is not None}
        for runtime in self.runtimes.values():
            for orphan in runtime.reap_orphans(known):
                log.warning("stopped instance %s that no record names", orphan)
        self.actions.watch(self.records)
        self.prober.start()

    def run(self) -> None:
        """Process events until :class:`Stop` arrives."""
        while not self.actions.stopping:
            timeout = max(0.0, min(self._next_timer() - self.clock(), 1.0))
            try:
                event: Event | None = self.events.get(timeout=timeout)
            except queue.Empty:
                event = None
            while event is not None:
                try:
                    self.handle(event)
                except Exception:
                    # One event that cannot be handled (a bug, a full disk) must not end the
                    # agent: its modules keep being supervised, and the log says what failed.
                    log.exception("handling %s failed", type(event).__name__)
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    event = None
            self.step()
            self.alive()

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
                error = f"{name} failed: {type(exc).__name__}: {exc}"[:2000]
                agent = self.records.agent.model_copy(update={"last_error": error})
                self.records = replace(self.records, agent=agent)
        busy = bool(self.records.ops)
        if self._busy and not busy:
            self.settled()
        self._busy = busy

    def handle(self, event: Event | decide.SettleDue) -> None:
        """One event through the pure step: look up what it needs, keep the new records,
        carry out the effects (on this thread; :meth:`submit` from any other)."""
        self._apply(
            decide.step(
                self.records,
                event,
                ctx=self._context,
                now=self.clock(),
                wall=datetime.now(UTC),
                rand=self.rand(),
                looked=self._look_up(self.records, event),
            )
        )

    def shutdown(self, *, stop_modules: bool) -> None:
        self.actions.shutdown(self.records, stop_modules=stop_modules)
        self.records = self.actions.save_state(self.records)
        self.hub.close()

    # --- steps ---------------------------------------------------------------------------------

    def _apply(self, stepped: decide.Step) -> None:
        records, effects = stepped
        self.actions.persist(effects)  # a desired state is saved before anything is done by it
        self.records = records
        self.actions.carry_out(records, effects)

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
                    current = service.current
                    lines = self._runtime_of(current).log_tail(current, FAILURE_LOG_LINES)
                    # The instance that died is the service's last failed one: its output stays
                    # reachable (service logs --failed) after it is restarted or replaced.
                    self.executor.failed_logs.keep(name, current.version, lines)
                failing = not alive or not healthy
                return decide.Looked(tuple(lines), failing and self._standby_alive(records, name))
            case OpDone(service=name, error=error):
                running = records.ops.get(name)
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

    def _runtime_of(self, instance: InstanceRecord) -> Runtime:
        return self.runtimes[instance.runtime]

    def _plan_if_needed(self) -> None:
        if self.actions.plan:
            self.actions.plan = False
            modules = self.records.desired.modules if self.records.desired is not None else []
            cached = {a.manifest_digest: self.actions.cached(a.manifest_digest) for a in modules}
            now, wall = self.clock(), datetime.now(UTC)
            runtimes = frozenset(self.runtimes)
            self._apply(decide.replan(self.records, cached=cached, runtimes=runtimes, now=now, wall=wall))

    def _gc_if_idle(self) -> None:
        if self.actions.gc and not any(op.kind is Op.FETCH for op in self.records.ops.values()):
            self.actions.gc = False
            self.actions.collect_garbage(self.records)

    def _save_if_needed(self) -> None:
        if self.actions.save:
            # raises on a full disk: stays dirty, tried again on the next step
            self.records = self.actions.save_state(self.records)
            self.actions.save = False

    def _report_if_needed(self) -> None:
        # At most one report per REPORT_MIN_GAP_S (the hub budgets each device's reports);
        # the newest state goes out when the gap is over.
        if self.actions.report and self.clock() - self._last_report >= REPORT_MIN_GAP_S:
            self.actions.report = False
            self._last_report = self.clock()
            self.next_report = self.clock() + self.config.report_interval_s
            self.actions.publish_report(self.records)

    # --- timers ------------------------------------------------------------------------------

    def _next_timer(self) -> float:
        r = self.records
        candidates = [self.next_report, r.next_poll]
        if self.actions.report:
            candidates.append(self._last_report + REPORT_MIN_GAP_S)
        candidates += r.restart_at.values()
        candidates += r.retry_at.values()
        candidates += (until for _, _, until in r.unschedulable.values())
        candidates += r.settle_at.values()
        return min(candidates) if candidates else self.clock() + 1.0

    def _timers(self) -> None:
        now, r = self.clock(), self.records
        retry_at = {name: at for name, at in r.retry_at.items() if now < at}
        unschedulable = {name: u for name, u in r.unschedulable.items() if now < u[2]}
        settled = [name for name, at in r.settle_at.items() if now >= at]
        if any(now >= t for t in r.restart_at.values()) or len(retry_at) < len(r.retry_at) or (
            len(unschedulable) < len(r.unschedulable)
        ):
            self.actions.plan = True
        settle_at = {name: at for name, at in r.settle_at.items() if name not in settled}
        self.records = replace(r, retry_at=retry_at, unschedulable=unschedulable, settle_at=settle_at)
        for name in settled:
            self.handle(decide.SettleDue(name))
        if now >= self.records.next_poll and not self.records.poll_in_flight:
            next_poll = now + self.config.poll_interval_s
            self.records = replace(self.records, poll_in_flight=True, next_poll=next_poll)
            self.executor.poll(self.records.etag)
        if now >= self.next_report:
            self.actions.report = True
        if now >= self._next_renewal_check:
            self._next_renewal_check = now + CERT_CHECK_S
            self.actions.renew_certificates(self.records, self.certificates.due)
