"""A service's state on one device, from its report (pure): Healthy only when the deployed
version is the one that serves."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cloud_hub.rollup import Verdict, state_on_device
from manifests.reported import ModuleStatus
from manifests.states import ServiceState, StateOnDevice

pytestmark = pytest.mark.sql_independent  # pure logic: no database

V1 = "sha256:" + "1" * 64
V2 = "sha256:" + "2" * 64
AT = datetime(2026, 1, 1, tzinfo=UTC)


def status(
    state: ServiceState, *, target: str, serving: str | None, reason: str | None = None
) -> ModuleStatus:
    version = {V1: "1", V2: "2"}
    return ModuleStatus(
        service="good",
        manifest_digest=target,
        version=version[target],
        state=state,
        reason=reason,
        since=AT,
        serving_digest=serving,
        serving_version=version[serving] if serving else None,
    )


@pytest.mark.parametrize(
    ("report", "state", "reason_part"),
    [
        pytest.param(status(ServiceState.HEALTHY, target=V2, serving=V2), ServiceState.HEALTHY, None,
                     id="the deployed version serves: Healthy"),
        pytest.param(status(ServiceState.HEALTHY, target=V2, serving=V1), ServiceState.TRANSITIONING,
                     "version 1 serves", id="Healthy while an older version serves: Transitioning"),
        pytest.param(status(ServiceState.HEALTHY, target=V1, serving=V1), ServiceState.TRANSITIONING,
                     "earlier version", id="a report about an older target: Transitioning"),
        pytest.param(status(ServiceState.FAILED, target=V2, serving=V1, reason="rolled back"),
                     ServiceState.FAILED, "rolled back", id="Failed with the old version serving: Failed"),
        pytest.param(status(ServiceState.HEALTHY, target=V2, serving=None), ServiceState.HEALTHY, None,
                     id="a report that names no serving version is taken as it is"),
    ],
)  # fmt: skip
def test_state_on_device(report: ModuleStatus, state: ServiceState, reason_part: str | None) -> None:
    here = state_on_device(report, V2)
    assert here.state is StateOnDevice(state.value)
    if reason_part is None:
        assert here.reason is None
    else:
        assert here.reason is not None and reason_part in here.reason


def test_a_device_that_has_not_reported() -> None:
    assert state_on_device(None, V2) == Verdict(StateOnDevice.PENDING, "not reported yet")
