"""Telemetry samples turned into per-service chart series (pure).

Samples are grouped into time buckets. In a bucket a service's requests/s is the sum over
devices of each device's mean rate (devices serve in parallel), and its p50 latency is the
median of the devices' p50s (a cheap, honest summary; exact fleet percentiles would need the
raw latencies, which devices do not send).

Device numbers are bounded before any arithmetic: a device sending ``1.7e308`` requests/s
used to overflow the sum, so the telemetry endpoint answered 500 and the dashboard went blank.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

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


def _bucket(ts: datetime, bucket_s: int) -> datetime:
    seconds = int(ts.timestamp())
    return datetime.fromtimestamp(seconds - seconds % bucket_s, tz=UTC)


def service_series(samples: Iterable[Telemetry], *, bucket_s: int = 10) -> dict[str, list[Point]]:
    """``{service: [Point, ...]}`` in time order, one point per bucket with data."""
    rates: dict[tuple[str, datetime], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    p50s: dict[tuple[str, datetime], list[float]] = defaultdict(list)
    for sample in samples:
        at = _bucket(sample.ts, bucket_s)
        for m in sample.modules:
            rates[(m.service, at)][sample.device_id].append(_bounded(m.requests_per_s, MAX_REQUESTS_PER_S))
            if m.p50_ms is not None:
                p50s[(m.service, at)].append(_bounded(m.p50_ms, MAX_LATENCY_MS))
    out: dict[str, list[Point]] = defaultdict(list)
    for service, at in sorted(rates, key=lambda k: (k[0], k[1])):
        per_device = rates[(service, at)]
        rps = sum(statistics.fmean(v) for v in per_device.values())
        lat = p50s.get((service, at))
        out[service].append(Point(at, round(rps, 3), round(statistics.median(lat), 3) if lat else None))
    return dict(out)
