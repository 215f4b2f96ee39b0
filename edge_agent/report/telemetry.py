"""Telemetry samples: per-module rates and latency quantiles from two scrapes of the scoring
server's ``/metrics``, CPU from two readings of CPU time; the device's own load (pure, except
the ``/proc`` readers at the bottom)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.scoring.metrics import Totals, latency_quantile
from manifests.reported import ModuleMetrics

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Reading:
    """One scrape of one instance, and when."""

    instance_id: str
    at: float  # time.monotonic()
    totals: Totals
    cpu_s: float | None = None
    memory_mb: float | None = None


def _score_requests(totals: Totals) -> int:
    return sum(n for (route, _), n in totals.requests.items() if route == "score")


def _quantiles_ms(
    before: Sequence[int], now: Sequence[int], qs: tuple[float, ...]
) -> tuple[float | None, ...] | None:
    """Quantiles (ms) of the requests between two readings of one histogram; None when a
    bucket went down (the counters were reset)."""
    delta = tuple(b - a for a, b in zip(before, now, strict=True))
    if any(d < 0 for d in delta):
        return None
    return tuple(None if (v := latency_quantile(delta, q)) is None else round(v * 1000, 3) for q in qs)


def module_metrics(service: str, before: Reading | None, now: Reading) -> ModuleMetrics:
    """The sample for ``service`` from the previous reading of the same instance (rates over
    the interval) or, for a new instance, from its totals alone (rates unknown: 0)."""
    requests = _score_requests(now.totals)
    same = before is not None and before.instance_id == now.instance_id and now.at > before.at
    rate = 0.0
    p50 = p95 = p99 = run_p50 = run_p95 = None
    cpu = None
    if same:
        assert before is not None
        dt = now.at - before.at
        delta = requests - _score_requests(before.totals)
        latency = _quantiles_ms(before.totals.buckets, now.totals.buckets, (0.5, 0.95, 0.99))
        if delta >= 0 and latency is not None:  # counters reset: an instance restarted
            rate = delta / dt
            p50, p95, p99 = latency
            run = _quantiles_ms(before.totals.run_buckets, now.totals.run_buckets, (0.5, 0.95))
            if run is not None:
                run_p50, run_p95 = run
        if before.cpu_s is not None and now.cpu_s is not None and now.cpu_s >= before.cpu_s:
            cpu = 100.0 * (now.cpu_s - before.cpu_s) / dt
    return ModuleMetrics(
        service=service,
        requests_total=requests,
        errors_total=now.totals.errors,
        requests_per_s=round(rate, 3),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        run_p50_ms=run_p50,
        run_p95_ms=run_p95,
        cpu_percent=None if cpu is None else round(cpu, 2),
        memory_mb=None if now.memory_mb is None else round(now.memory_mb, 2),
    )


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    total: int


def device_cpu_percent(before: CpuTimes | None, now: CpuTimes) -> float | None:
    if before is None or now.total <= before.total:
        return None
    return round(100.0 * (now.busy - before.busy) / (now.total - before.total), 2)


# --- readers (the only I/O here) ----------------------------------------------------------


def read_cpu_times() -> CpuTimes | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return CpuTimes(busy=sum(fields) - idle, total=sum(fields))


def read_memory_used_mb() -> float | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        info = dict(line.split(":", 1) for line in lines if ":" in line)
        total = int(info["MemTotal"].split()[0])
        available = int(info["MemAvailable"].split()[0])
    except (OSError, KeyError, ValueError):
        return None
    return round((total - available) / 1024, 1)


def own_rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0
