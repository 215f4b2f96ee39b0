"""The dashboard's chart series from telemetry samples (pure): p95 beside p50, and the error
rate from the devices' counters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cloud_hub.ingest.series import service_series
from manifests.reported import ModuleMetrics, Telemetry

pytestmark = pytest.mark.sql_independent

AT = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def sample(device: str, second: int, requests: int, errors: int, p95: float | None = None) -> Telemetry:
    metrics = ModuleMetrics(
        service="svc", requests_total=requests, errors_total=errors, requests_per_s=1.0,
        p50_ms=None if p95 is None else p95 / 2, p95_ms=p95,
    )  # fmt: skip
    return Telemetry(device_id=device, ts=AT.replace(second=second), modules=[metrics])


def test_p95_is_the_median_of_the_devices_p95s() -> None:
    series = service_series(
        [sample("a", 1, 0, 0, 10.0), sample("b", 2, 0, 0, 30.0), sample("c", 3, 0, 0, 40.0)], bucket_s=10
    )
    [point] = series["svc"]
    assert point.p95_ms == 30.0 and point.p50_ms == 15.0


def test_error_rate_comes_from_the_counters_deltas_of_each_device() -> None:
    series = service_series(
        [
            sample("a", 1, 100, 0),
            sample("a", 11, 200, 10),  # a: 100 requests, 10 errors in the second bucket
            sample("b", 2, 50, 5),
            sample("b", 12, 150, 5),  # b: 100 requests, no error
            sample("a", 21, 5, 0),  # a restarted: its counters went down, no delta
        ],
        bucket_s=10,
    )
    first, second, third = series["svc"]
    assert first.error_pct is None  # nothing to compare the first samples with
    assert second.error_pct == 5.0  # 10 errors in 200 requests
    assert third.error_pct is None


def test_samples_from_agents_without_p95_still_chart() -> None:
    old = ModuleMetrics(service="svc", requests_total=1, errors_total=0, requests_per_s=2.0, p50_ms=4.0)
    [point] = service_series([Telemetry(device_id="a", ts=AT, modules=[old])], bucket_s=10)["svc"]
    assert point.p50_ms == 4.0 and point.p95_ms is None and point.requests_per_s == 2.0


def test_run_p95_is_the_median_of_the_devices_run_p95s_and_absent_from_older_agents() -> None:
    def with_run(device: str, run_p95: float | None) -> Telemetry:
        metrics = ModuleMetrics(service="svc", requests_total=1, errors_total=0, requests_per_s=1.0,
                                p50_ms=5.0, p95_ms=50.0, run_p95_ms=run_p95)  # fmt: skip
        return Telemetry(device_id=device, ts=AT, modules=[metrics])

    samples = [with_run("a", 10.0), with_run("b", 30.0), with_run("c", None)]
    [point] = service_series(samples, bucket_s=10)["svc"]
    assert (point.p95_ms, point.run_p95_ms) == (50.0, 20.0)
    [older] = service_series([with_run("a", None)], bucket_s=10)["svc"]
    assert older.run_p95_ms is None
