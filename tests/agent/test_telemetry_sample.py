"""The agent's telemetry sample from two scrapes of a scoring server's /metrics (pure)."""

from __future__ import annotations

from edge_agent.report.telemetry import Reading, module_metrics
from edge_agent.scoring.metrics import BUCKETS_S, Totals


def totals(requests: int, errors: int, buckets: dict[float, int]) -> Totals:
    counts = (*(buckets.get(bound, 0) for bound in BUCKETS_S), 0)
    return Totals(
        requests={("score", "200"): requests}, errors=errors, buckets=counts,
        sum_ns=0, count=sum(counts), workers=1, ready_workers=1,
    )  # fmt: skip


def test_a_sample_carries_p95_between_p50_and_p99() -> None:
    before = Reading("i-1", at=10.0, totals=totals(0, 0, {}))
    # 100 requests in 10 s: 90 under 5 ms, 10 between 50 and 100 ms.
    now = Reading("i-1", at=20.0, totals=totals(100, 3, {0.005: 90, 0.1: 10}))
    sample = module_metrics("digits", before, now)
    assert sample.requests_per_s == 10.0
    assert sample.p50_ms is not None and sample.p95_ms is not None and sample.p99_ms is not None
    # The 95th of 100 is the 5th of the 10 slow ones: half-way through the 50-100 ms bucket.
    assert sample.p95_ms == 75.0
    assert sample.p50_ms < sample.p95_ms < sample.p99_ms


def test_a_new_instance_has_no_quantiles_yet() -> None:
    sample = module_metrics("digits", None, Reading("i-2", at=5.0, totals=totals(7, 0, {0.005: 7})))
    assert sample.p50_ms is None and sample.p95_ms is None and sample.p99_ms is None
