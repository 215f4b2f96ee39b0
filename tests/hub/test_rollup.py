"""Rolling states up into a service's and a device's state, and which reports are news (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cloud_hub.ingest.changes import module_changes
from cloud_hub.rollup import DeviceState, device_state, service_state
from manifests.reported import ModuleStatus
from manifests.states import ServiceState, StateOnDevice

pytestmark = pytest.mark.sql_independent  # pure logic: no database

F, U, N, T, H = (
    ServiceState.FAILED,
    ServiceState.UNSCHEDULABLE,
    ServiceState.UNHEALTHY,
    ServiceState.TRANSITIONING,
    ServiceState.HEALTHY,
)
P = StateOnDevice.PENDING


def here(state: ServiceState | StateOnDevice) -> StateOnDevice:
    return StateOnDevice(state.value)


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([], U),  # targets nothing: nowhere to run it
        ([H], H),
        ([H, H, H], H),
        ([P], T),  # targeted but not reported yet: still being deployed
        ([H, P], T),
        ([H, T], T),
        ([T, P], T),
        ([H, N], N),
        ([T, N], N),
        ([N, U], U),
        ([H, T, N, U], U),
        ([H, T, N, U, F], F),
        ([F, H], F),
        ([P, F], F),
        ([U, P], U),
    ],
)
def test_service_rollup(states: list[ServiceState | StateOnDevice], expected: ServiceState) -> None:
    assert service_state(here(s) for s in states) is expected
    assert service_state(here(s) for s in reversed(states)) is expected


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([], DeviceState.IDLE),  # nothing assigned
        ([P], DeviceState.PENDING),
        ([P, P], DeviceState.PENDING),
        ([H, P], DeviceState.PENDING),  # not Healthy before every service reported
        ([T, P], DeviceState.TRANSITIONING),
        ([H, H], DeviceState.HEALTHY),
        ([P, N], DeviceState.UNHEALTHY),
        ([F, U, P], DeviceState.FAILED),
    ],
)
def test_device_rollup(states: list[ServiceState | StateOnDevice], expected: DeviceState) -> None:
    assert device_state(here(s) for s in states) is expected
    assert device_state(here(s) for s in reversed(states)) is expected


AT = datetime(2026, 1, 1, tzinfo=UTC)
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def st(service: str, state: ServiceState, digest: str = D1, reason: str | None = None) -> ModuleStatus:
    return ModuleStatus(service=service, manifest_digest=digest, state=state, reason=reason, since=AT)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ([], [], []),
        ([], [st("svc", T)], [("deployed", "svc")]),
        ([], [st("svc", H)], [("deployed", "svc"), ("healthy", "svc")]),
        ([st("svc", T)], [st("svc", T)], []),  # a repeat is no news
        ([st("svc", T)], [st("svc", H)], [("healthy", "svc")]),
        ([st("svc", H)], [st("svc", H)], []),
        ([st("svc", H)], [st("svc", N)], [("unhealthy", "svc")]),
        ([st("svc", T)], [st("svc", F, reason="boom")], [("failed", "svc")]),
        ([st("svc", F, reason="a")], [st("svc", F, reason="b")], [("failed", "svc")]),
        ([st("svc", F, reason="a")], [st("svc", F, reason="a")], []),
        ([st("svc", H)], [st("svc", T, D2)], [("deployed", "svc")]),  # new version
        ([st("svc", H)], [], [("removed", "svc")]),
        ([st("a", H)], [st("b", U)], [("deployed", "b"), ("unschedulable", "b"), ("removed", "a")]),
    ],
)
def test_module_changes(
    old: list[ModuleStatus], new: list[ModuleStatus], expected: list[tuple[str, str]]
) -> None:
    changes = module_changes("dev-1", {s.service: s for s in old}, new)
    assert [(c.kind, c.service) for c in changes] == expected
    assert all("dev-1" in c.message for c in changes)


def test_failed_change_names_the_reason() -> None:
    [deployed, failed] = module_changes("dev-1", {}, [st("svc", F, reason="image missing")])
    assert deployed.kind == "deployed"
    assert failed.message == "svc failed on dev-1: image missing"


def test_service_series_sums_rates_and_takes_median_p50() -> None:
    from cloud_hub.ingest.series import Point, service_series
    from manifests.reported import ModuleMetrics, Telemetry

    def sample(device: str, second: int, rps: float, p50: float | None) -> Telemetry:
        metrics = ModuleMetrics(
            service="svc", requests_total=1, errors_total=0, requests_per_s=rps, p50_ms=p50
        )
        return Telemetry(device_id=device, ts=AT.replace(second=second), modules=[metrics])

    series = service_series(
        [
            sample("a", 1, 2.0, 10.0),
            sample("a", 5, 4.0, 30.0),  # same bucket as above: a's mean rate is 3
            sample("b", 2, 1.0, 20.0),
            sample("b", 12, 5.0, None),  # next bucket, no latency
        ],
        bucket_s=10,
    )
    assert series == {
        "svc": [Point(AT, 4.0, 20.0), Point(AT.replace(second=10), 5.0, None)],
    }
