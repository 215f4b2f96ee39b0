"""Telemetry samples turned into per-service chart series (pure).

Samples are grouped into time buckets. In a bucket a service's requests/s is the sum over
devices of each device's mean rate (devices serve in parallel), and its p50 and p95 latencies
(and the p95 of the module's run() alone) are the medians of the devices' p50s and p95s (a
cheap, honest summary; exact fleet percentiles would need the raw latencies, which devices do
not send). Its error rate is the
errors over the requests the devices counted since their previous sample (the deltas of the
``errors_total``/``requests_total`` counters, in percent); a counter that went down (the
module restarted) gives no delta, and a bucket without requests has no error rate.

Device numbers are bounded before any arithmetic: a device sending ``1.7e308`` requests/s
used to overflow the sum, so the telemetry endpoint answered 500 and the dashboard went blank.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise

from manifests.reported import Telemetry

#: No device serves more than this; larger claims are charted as this much.
MAX_REQUESTS_PER_S = 1e9
MAX_LATENCY_MS = 1e9


def _bounded(value: float, cap: float) -> float:
    if math.isnan(value) or value <= 0:
        return 0.0
    return min(value, cap)


@dataclass(frozen=True)
class Point:
    t: datetime  # start of the bucket
    requests_per_s: float
    p50_ms: float | None
    p95_ms: float | None = None
    error_pct: float | None = None  # errors per 100 requests counted in the bucket
    run_p95_ms: float | None = None  # the module's run() alone (median over the devices)


def _bucket(ts: datetime, bucket_s: int) -> datetime:
    seconds = int(ts.timestamp())
    return datetime.fromtimestamp(seconds - seconds % bucket_s, tz=UTC)


Bucketing = Callable[[datetime], datetime]


def _counter_deltas(
    samples: Iterable[Telemetry], bucket: Bucketing
) -> dict[tuple[str, datetime], tuple[int, int]]:
    """``{(service, bucket): (requests, errors)}`` counted between each device's consecutive
    samples, charged to the bucket of the later one."""
    counters: dict[tuple[str, str], list[tuple[datetime, int, int]]] = defaultdict(list)
    for sample in samples:
        for m in sample.modules:
            # Rows an older hub stored unchecked may lack the counters: no error rate from them.
            requests, errors = getattr(m, "requests_total", None), getattr(m, "errors_total", None)
            if isinstance(requests, int) and isinstance(errors, int):
                counters[(m.service, sample.device_id)].append((sample.ts, requests, errors))
    out: dict[tuple[str, datetime], tuple[int, int]] = defaultdict(lambda: (0, 0))
    for (service, _), readings in counters.items():
        readings.sort(key=lambda r: r[0])
        for (_, req0, err0), (ts, req1, err1) in pairwise(readings):
            if req1 < req0 or err1 < err0:
                continue  # counters restarted with the module: this interval is unknown
            key = (service, bucket(ts))
            requests, errors = out[key]
            out[key] = (requests + req1 - req0, errors + min(err1 - err0, req1 - req0))
    return out


def _median(values: list[float] | None) -> float | None:
    return round(statistics.median(values), 3) if values else None


def service_series(samples: Iterable[Telemetry], *, bucket_s: int = 10) -> dict[str, list[Point]]:
    """``{service: [Point, ...]}`` in time order, one point per bucket with data."""
    return _series(samples, lambda ts: _bucket(ts, bucket_s))


_WHOLE = datetime.fromtimestamp(0, tz=UTC)


def service_summary(samples: Iterable[Telemetry]) -> dict[str, Point]:
    """``{service: Point}`` over all ``samples`` as one bucket (the alert rules' window), by
    the same rules as the charts; the point's ``t`` carries no meaning."""
    return {service: points[0] for service, points in _series(samples, lambda _ts: _WHOLE).items()}


def _series(samples: Iterable[Telemetry], bucket: Bucketing) -> dict[str, list[Point]]:
    samples = list(samples)
    rates: dict[tuple[str, datetime], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    p50s: dict[tuple[str, datetime], list[float]] = defaultdict(list)
    p95s: dict[tuple[str, datetime], list[float]] = defaultdict(list)
    run_p95s: dict[tuple[str, datetime], list[float]] = defaultdict(list)
    for sample in samples:
        at = bucket(sample.ts)
        for m in sample.modules:
            rates[(m.service, at)][sample.device_id].append(_bounded(m.requests_per_s, MAX_REQUESTS_PER_S))
            if m.p50_ms is not None:
                p50s[(m.service, at)].append(_bounded(m.p50_ms, MAX_LATENCY_MS))
            if m.p95_ms is not None:
                p95s[(m.service, at)].append(_bounded(m.p95_ms, MAX_LATENCY_MS))
            # A row an older hub stored unchecked may lack the field (agents before run time).
            run_p95 = getattr(m, "run_p95_ms", None)
            if run_p95 is not None:
                run_p95s[(m.service, at)].append(_bounded(run_p95, MAX_LATENCY_MS))
    deltas = _counter_deltas(samples, bucket)
    out: dict[str, list[Point]] = defaultdict(list)
    for service, at in sorted(rates, key=lambda k: (k[0], k[1])):
        per_device = rates[(service, at)]
        rps = sum(statistics.fmean(v) for v in per_device.values())
        requests, errors = deltas.get((service, at), (0, 0))
        error_pct = round(100.0 * errors / requests, 3) if requests > 0 else None
        point = Point(
            at,
            round(rps, 3),
            _median(p50s.get((service, at))),
            _median(p95s.get((service, at))),
            error_pct,
            _median(run_p95s.get((service, at))),
        )
        out[service].append(point)
    return dict(out)
