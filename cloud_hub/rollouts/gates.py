"""A wave's gates judged from telemetry (pure).

A cohort is a set of devices: those of the waves released so far that serve the new version,
or those still serving the previous one. Over the bake time its error rate is the errors over
the requests its devices counted (the deltas of each device's counters between consecutive
samples; a counter that went down, a module restart, counts nothing), and its p95 is the
median over its devices of each device's median p95 (the charts' own summary,
``cloud_hub.ingest.series``: devices send percentiles, not raw latencies).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from manifests.reported import Telemetry
from manifests.rollout import Gate


@dataclass(frozen=True)
class Cohort:
    devices: int = 0
    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    #: intervals between two samples of one device that were counted: none, nothing measured
    intervals: int = 0

    @property
    def error_pct(self) -> float | None:
        return None if self.requests == 0 else 100.0 * self.errors / self.requests


def cohort_of(samples: Iterable[Telemetry], service: str, devices: frozenset[str]) -> Cohort:
    """What ``devices`` measured for ``service`` in ``samples`` (any order)."""
    counters: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    p95s: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        if sample.device_id not in devices:
            continue
        for m in sample.modules:
            if m.service != service:
                continue
            counters[sample.device_id].append((sample.ts.timestamp(), m.requests_total, m.errors_total))
            if m.p95_ms is not None:
                p95s[sample.device_id].append(m.p95_ms)
    requests = errors = intervals = 0
    for readings in counters.values():
        readings.sort()
        for (_, req0, err0), (_, req1, err1) in pairwise(readings):
            if req1 < req0 or err1 < err0:
                continue  # the module restarted between the two samples
            requests += req1 - req0
            intervals += 1
            errors += min(err1 - err0, req1 - req0)
    per_device = [statistics.median(v) for v in p95s.values() if v]
    return Cohort(
        devices=len(counters),
        requests=requests,
        errors=errors,
        p95_ms=statistics.median(per_device) if per_device else None,
        intervals=intervals,
    )


def breach(gates: Sequence[Gate], new: Cohort, old: Cohort, previous: str) -> str | None:
    """The first gate the new version's cohort breaks, said in one line; None when none does.

    A gate with nothing to judge passes: no requests on the new version (its telemetry came,
    the devices served nothing), or (relative) no device left on the previous version with a
    latency to compare. Whether any telemetry came at all is the caller's question
    (:attr:`Cohort.intervals`).
    """
    for gate in gates:
        if gate.metric == "error_rate":
            rate = new.error_pct
            if rate is not None and rate >= gate.limit:
                was = old.error_pct
                versus = f" vs {was:.1f}% on {previous}" if was is not None else ""
                return f"error rate {rate:.1f}%{versus} (gate {gate.text()})"
        else:
            p95 = new.p95_ms
            if p95 is None:
                continue
            if gate.relative:
                if old.p95_ms is None or old.p95_ms <= 0:
                    continue
                if p95 >= gate.limit * old.p95_ms:
                    return f"p95 {p95:.0f} ms vs {old.p95_ms:.0f} ms on {previous} (gate {gate.text()})"
            elif p95 >= gate.limit:
                return f"p95 {p95:.0f} ms (gate {gate.text()})"
    return None
