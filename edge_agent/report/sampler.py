"""The telemetry thread: every interval, one sample of the device and of each module."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from edge_agent.data.uploader import SpoolFigures
from edge_agent.health import Watched
from edge_agent.report.telemetry import (
    CpuTimes,
    Reading,
    device_cpu_percent,
    module_metrics,
    own_rss_mb,
    read_cpu_times,
    read_memory_used_mb,
)
from edge_agent.runtime import probe
from edge_agent.runtime.base import Runtime
from manifests.compat import encode_for_hub
from manifests.desired import RuntimeKind
from manifests.reported import Telemetry

log = logging.getLogger(__name__)


class Sampler:
    def __init__(
        self,
        device_id: str,
        runtimes: Mapping[RuntimeKind, Runtime],
        watched: Callable[[], list[Watched]],
        publish: Callable[[bytes], object],
        *,
        interval_s: float,
        hub_reads_newer: Callable[[], bool],
        spools: Callable[[], Mapping[str, SpoolFigures]] = dict,
    ) -> None:
        self._device = device_id
        self._runtimes = runtimes
        self._watched = watched
        self._publish = publish
        self._hub_reads_newer = hub_reads_newer
        self._spools = spools
        self._interval = interval_s
        self._readings: dict[str, Reading] = {}  # service -> previous reading
        self._cpu: CpuTimes | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgepack-telemetry", daemon=True)
        self.samples = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._publish(encode_for_hub(self.sample(), hub_reads_newer=self._hub_reads_newer()))
                self.samples += 1
            except Exception:
                log.exception("telemetry sample failed")

    def sample(self) -> Telemetry:
        modules = []
        seen: set[str] = set()
        spools = self._spools()
        for w in self._watched():
            runtime = self._runtimes.get(w.instance.runtime)
            if runtime is not None:
                runtime.maintain(w.instance)
            target = probe.Target.of(w.instance)
            totals = probe.metrics(target) if target is not None else None
            if totals is None:
                continue
            usage = runtime.usage(w.instance) if runtime is not None else None
            reading = Reading(
                instance_id=w.instance.id,
                at=time.monotonic(),
                totals=totals,
                cpu_s=usage.cpu_s if usage else None,
                memory_mb=usage.memory_mb if usage else None,
            )
            metrics = module_metrics(w.service, self._readings.get(w.service), reading)
            spool = spools.get(w.service)
            if spool is not None:
                update = {
                    "data_spooled_bytes": spool.spooled_bytes,
                    "data_dropped_total": spool.dropped_total,
                }
                metrics = metrics.model_copy(update=update)
            modules.append(metrics)
            self._readings[w.service] = reading
            seen.add(w.service)
        for gone in set(self._readings) - seen:
            del self._readings[gone]
        cpu = read_cpu_times()
        percent = device_cpu_percent(self._cpu, cpu) if cpu else None
        self._cpu = cpu
        return Telemetry(
            device_id=self._device,
            ts=datetime.now(UTC),
            cpu_percent=percent,
            memory_mb=read_memory_used_mb(),
            agent_memory_mb=round(own_rss_mb(), 2),
            modules=modules,
        )
