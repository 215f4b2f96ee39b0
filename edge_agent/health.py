"""The prober: watches every serving instance, on a thread of its own.

For each instance it checks, every ``period_s`` of the service's health probe, that the
process or container is alive and that its health path answers on its private probe port
within ``timeout_s``. Results go to the reconcile loop as :class:`ProbeResult`; the loop
decides (Unhealthy after ``failure_threshold`` misses, restart per policy). An instance that
died is reported at once, whatever its period.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edge_agent.runtime import probe
from edge_agent.runtime.base import Runtime
from edge_agent.state.records import InstanceRecord
from manifests.desired import RuntimeKind

log = logging.getLogger(__name__)

#: how often liveness (not the HTTP probe) is checked: a crash is noticed within this
LIVENESS_PERIOD_S = 0.5


@dataclass(frozen=True)
class ProbeResult:
    service: str
    instance_id: str
    alive: bool
    healthy: bool
    exit_code: int | None = None


@dataclass(frozen=True)
class Watched:
    service: str
    instance: InstanceRecord


class Prober:
    def __init__(
        self,
        runtimes: Mapping[RuntimeKind, Runtime],
        report: Callable[[ProbeResult], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._runtimes = runtimes
        self._report = report
        self._clock = clock
        self._lock = threading.Lock()
        self._watched: dict[str, Watched] = {}
        self._next_probe: dict[str, float] = {}  # instance id -> when its HTTP probe is due
        self._dead: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgepack-prober", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def watch(self, watched: list[Watched]) -> None:
        """Replace the set of watched instances (the loop calls this after every change)."""
        with self._lock:
            self._watched = {w.instance.id: w for w in watched}
            for instance_id in list(self._next_probe):
                if instance_id not in self._watched:
                    del self._next_probe[instance_id]
            self._dead &= set(self._watched)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                watched = list(self._watched.values())
            now = self._clock()
            for w in watched:
                try:
                    self._check(w, now)
                except Exception:  # a probe must never kill the prober
                    log.exception("probing %s failed", w.instance.id)
            self._wake.wait(LIVENESS_PERIOD_S)
            self._wake.clear()

    def _check(self, w: Watched, now: float) -> None:
        instance = w.instance
        if instance.id in self._dead:
            return
        runtime = self._runtimes.get(instance.runtime)
        if runtime is None:
            return
        alive = runtime.liveness(instance)
        if not alive.alive:
            self._dead.add(instance.id)
            self._report(ProbeResult(w.service, instance.id, False, False, alive.exit_code))
            return
        health = instance.assignment.settings.health
        due = self._next_probe.get(instance.id)
        if due is None:
            due = now  # the first probe of an instance runs at once
        if now < due:
            return
        self._next_probe[instance.id] = now + health.period_s
        target = probe.Target.of(instance)
        ok = target is not None and probe.healthy(target, health.path, health.timeout_s)
        self._report(ProbeResult(w.service, instance.id, True, ok))
