"""The agent's pure decisions about a settled service, as tables: which state a service is in
when nothing is under way (Healthy only when the target serves), and what garbage collection
keeps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edge_agent.reconcile.garbage import kept
from edge_agent.reconcile.plan import assignment_key
from edge_agent.reconcile.steady import steady_state
from edge_agent.state.records import InstanceRecord, ServiceRecord
from manifests.desired import DeploymentSettings, ModuleAssignment, RuntimeKind
from manifests.states import ServiceState

H, T, F, U = ServiceState.HEALTHY, ServiceState.TRANSITIONING, ServiceState.FAILED, ServiceState.UNSCHEDULABLE
AT = datetime(2026, 1, 1, tzinfo=UTC)

V1 = ModuleAssignment(
    service="good",
    module="good",
    version="1",
    manifest_digest="sha256:" + "1" * 64,
    settings=DeploymentSettings(port=9000),
)
V2 = V1.model_copy(update={"version": "2", "manifest_digest": "sha256:" + "2" * 64})
V1_DOCKER = V1.model_copy(update={"settings": DeploymentSettings(port=9000, runtime=RuntimeKind.DOCKER)})
V3 = V1.model_copy(update={"version": "3", "manifest_digest": "sha256:" + "3" * 64})


def instance(a: ModuleAssignment, name: str = "i") -> InstanceRecord:
    return InstanceRecord(
        id=f"{a.version}-{name}",
        assignment=a,
        key=assignment_key(a),
        runtime=RuntimeKind.PROCESS,
        run_dir="/run/x",
        started_at=AT,
    )


RETRYING = "fetch of version 2: hub answered 503; retrying in 55s"
NO_DOCKER = "runtime docker is not enabled on this device; version 1 (process) keeps serving"


@pytest.mark.parametrize(
    ("target", "current", "serving", "failed", "now", "expected"),
    [
        pytest.param(V1, V1, True, {}, (T, "starting"), (H, None), id="the target serves: Healthy"),
        pytest.param(V1, V1, False, {}, (H, None), (T, None), id="the target is not alive: Transitioning"),
        pytest.param(V1, None, False, {}, (T, None), (T, None), id="nothing runs yet: Transitioning"),
        pytest.param(None, V1, True, {}, (H, None), (H, None), id="no target, alive: Healthy"),
        # finding 3: a probe of the old version must not turn a retry into Healthy ...
        pytest.param(V2, V1, True, {}, (T, RETRYING), (T, RETRYING),
                     id="the target's download is retried while v1 serves: stays Transitioning"),
        pytest.param(V2, V1, True, {}, (H, None), (T, "version 2 is not running yet; version 1 serves"),
                     id="Healthy while v1 serves for a v2 target: Transitioning, naming v1"),
        # ... nor an Unschedulable runtime into Healthy (no flapping)
        pytest.param(V1_DOCKER, V1, True, {}, (U, NO_DOCKER), (U, NO_DOCKER),
                     id="same module, runtime the device lacks: stays Unschedulable"),
        pytest.param(V2, V1, True, {assignment_key(V2): "init() failed"}, (T, None),
                     (F, "init() failed; rolled back to version 1, which keeps serving"),
                     id="the target failed for good, v1 serves: Failed, rolled back"),
        pytest.param(V2, V2, False, {assignment_key(V2): "crash loop"}, (T, None),
                     (F, "crash loop"), id="the target failed and nothing serves: Failed"),
    ],
)  # fmt: skip
def test_steady_state(
    target: ModuleAssignment | None,
    current: ModuleAssignment | None,
    serving: bool,
    failed: dict[str, str],
    now: tuple[ServiceState, str | None],
    expected: tuple[ServiceState, str | None],
) -> None:
    got = steady_state(
        target=target,
        current=instance(current) if current else None,
        serving=serving,
        failed=failed,
        state=now[0],
        reason=now[1],
    )
    assert got == expected


def test_garbage_collection_keeps_every_version_a_service_may_run_again_and_live_instances() -> None:
    service = ServiceRecord(
        name="good",
        since=AT,
        current=instance(V2),
        standby=instance(V1, "standby"),  # the last good, serving until v2 settles
        last_good=V2,
        previous=V1,
        target=V3,
    )
    keep = kept({"good": service}, in_flight=[V3], retiring=["0-old"])
    assert keep.digests == {V1.manifest_digest, V2.manifest_digest, V3.manifest_digest}
    assert keep.instances == {"2-i", "1-standby", "0-old"}
    bare = ServiceRecord(name="good", since=AT, current=instance(V2), last_good=V2, target=V2)
    assert kept({"good": bare}, in_flight=[], retiring=[]).digests == {V2.manifest_digest}
