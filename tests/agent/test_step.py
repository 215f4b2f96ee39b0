"""The reconcile loop's pure decisions (:mod:`edge_agent.reconcile.step`) as tables: a service's
records and an event in, the new records and the effects out. No agent, clock or runtime."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest

from edge_agent.health import ProbeResult
from edge_agent.reconcile.plan import assignment_key
from edge_agent.reconcile.step import Dirty, Health, Outcome, Retire, Slot, Watch, on_probe
from edge_agent.state.records import InstanceRecord, ServiceRecord
from manifests.desired import DeploymentSettings, ModuleAssignment, RestartPolicy, RuntimeKind
from manifests.device import RestartSettings
from manifests.states import ServiceState

H, T, F, U = ServiceState.HEALTHY, ServiceState.TRANSITIONING, ServiceState.FAILED, ServiceState.UNHEALTHY
AT = datetime(2026, 1, 1, tzinfo=UTC)
NOW = 1000.0  # monotonic
RESTART = RestartSettings()  # base 1 s doubling, crash loop at 5, forgiven after 600 s

V1 = ModuleAssignment(
    service="good",
    module="good",
    version="1",
    manifest_digest="sha256:" + "1" * 64,
    settings=DeploymentSettings(port=9000),
)
V2 = V1.model_copy(update={"version": "2", "manifest_digest": "sha256:" + "2" * 64})


def policy(a: ModuleAssignment, p: RestartPolicy) -> ModuleAssignment:
    return a.model_copy(update={"settings": a.settings.model_copy(update={"restart_policy": p})})


def instance(a: ModuleAssignment, name: str = "i") -> InstanceRecord:
    return InstanceRecord(
        id=f"{a.version}-{name}",
        assignment=a,
        key=assignment_key(a),
        runtime=RuntimeKind.PROCESS,
        run_dir="/run/x",
        started_at=AT,
    )


@dataclass(frozen=True)
class Given:
    """A service ``good`` whose current instance runs ``current`` for ``target``."""

    current: ModuleAssignment = field(default_factory=lambda: V1)
    target: ModuleAssignment | None = None
    state: ServiceState = H
    reason: str | None = None
    failures: int = 0
    healthy_for_s: float | None = 5.0  # None: not healthy since anything
    health: Health = field(default_factory=Health)
    previous: ModuleAssignment | None = None
    standby: ModuleAssignment | None = None
    standby_alive: bool = False
    busy: bool = False
    killing: bool = False
    failed: dict[str, str] = field(default_factory=dict)

    def slot(self) -> Slot:
        return Slot(
            service=ServiceRecord(
                name="good",
                since=AT - timedelta(hours=1),
                current=instance(self.current),
                standby=instance(self.standby, "standby") if self.standby else None,
                last_good=self.current,
                previous=self.previous,
                target=self.target or self.current,
                state=self.state,
                reason=self.reason,
                failures=self.failures,
                failed=dict(self.failed),
                healthy_since=AT - timedelta(seconds=self.healthy_for_s)
                if self.healthy_for_s is not None
                else None,
            ),
            health=self.health,
            standby_alive=self.standby_alive,
            busy=self.busy,
            killing=self.killing,
        )


@dataclass(frozen=True)
class Then:
    state: ServiceState
    reason: str | None
    failures: int = 0
    restart_at: float | None = None
    health: Health = field(default_factory=Health)
    current: str = "1-i"
    effects: tuple[type, ...] = ()  # the kinds of effect besides Dirty and Say, in order
    failed: tuple[str, ...] = ()  # the versions failed here for good
    standby: str | None = None


def probe(alive: bool = True, healthy: bool = True, code: int | None = None, iid: str = "") -> ProbeResult:
    """A probe result of instance ``iid`` (by default, whichever is current)."""
    return ProbeResult("good", iid, alive=alive, healthy=healthy, exit_code=code)


def probed(slot: Slot, result: ProbeResult, lines: list[str] | None = None) -> Outcome:
    """``on_probe`` at NOW/AT with the median jitter (delays are exactly 1, 2, 4 ... s)."""
    assert slot.service.current is not None
    result = replace(result, instance_id=result.instance_id or slot.service.current.id)
    return on_probe(slot, result, log_lines=lines or [], restart=RESTART, now=NOW, wall=AT, rand=0.5)


BOOM = ["Traceback", "RuntimeError: boom"]
EXITED_1 = "version 1 exited (code 1); last log lines: Traceback | RuntimeError: boom"
EXITED_2 = "version 2 exited (code 1); last log lines: Traceback | RuntimeError: boom"
LOOP_2 = f"crash loop: failed 5 times in a row; {EXITED_2}"
WAITING = "stopping the instance that stopped answering"

PROBE_CASES = [
    pytest.param(Given(state=T, reason="starting version 1"), probe(), Then(H, None),
                 id="healthy probe of the target: Healthy"),
    pytest.param(Given(state=T, reason=WAITING, killing=True), probe(), Then(T, WAITING),
                 id="healthy probe while the hung predecessor is being killed: not Healthy yet"),
    pytest.param(Given(state=T, reason="restarting", busy=True), probe(), Then(T, "restarting"),
                 id="healthy probe while an operation holds the service: unchanged"),
    pytest.param(Given(target=V2, state=T, reason="fetch of version 2: 503; retrying in 55s"), probe(),
                 Then(T, "fetch of version 2: 503; retrying in 55s"),
                 id="healthy probe of v1 while v2 is retried: stays Transitioning"),
    pytest.param(Given(failures=3, healthy_for_s=601), probe(), Then(H, None, failures=0),
                 id="healthy for longer than reset_after_s: failures forgiven"),
    pytest.param(Given(failures=3, healthy_for_s=30), probe(), Then(H, None, failures=3),
                 id="healthy for a short while: failures still count"),
    pytest.param(Given(), probe(iid="0-old"), Then(H, None),
                 id="probe of an instance that no longer serves: ignored"),
    pytest.param(Given(), probe(healthy=False), Then(H, None, health=Health(misses=1)),
                 id="one missed probe: counted, no state change"),
    pytest.param(Given(health=Health(misses=2)), probe(healthy=False),
                 Then(U, "missed 3 health probes in a row on /healthz; restarting in 1.0s", failures=1,
                      restart_at=NOW + 1.0, health=Health(misses=3)),
                 id="failure_threshold missed probes: Unhealthy, restart after the backoff"),
    pytest.param(Given(health=Health(misses=3)), probe(healthy=False), Then(H, None, health=Health(misses=4)),
                 id="missed probes past the threshold: counted once only"),
    pytest.param(Given(), probe(alive=False, code=1),
                 Then(U, f"{EXITED_1}; restarting in 1.0s", failures=1, restart_at=NOW + 1.0,
                      health=Health(alive=False)),
                 id="exited: Unhealthy with its last log lines, restart after the backoff"),
    pytest.param(Given(failures=3), probe(alive=False, code=1),
                 Then(U, f"{EXITED_1}; restarting in 8.0s", failures=4, restart_at=NOW + 8.0,
                      health=Health(alive=False)),
                 id="fourth failure in a row: the delay doubles each time"),
    pytest.param(Given(failures=4, healthy_for_s=601), probe(alive=False, code=1),
                 Then(U, f"{EXITED_1}; restarting in 1.0s", failures=1, restart_at=NOW + 1.0,
                      health=Health(alive=False)),
                 id="exit after a long healthy run: counted afresh"),
    pytest.param(Given(health=Health(alive=False)), probe(alive=False, code=1),
                 Then(H, None, health=Health(alive=False)),
                 id="exit already known (found dead at boot): nothing more"),
    pytest.param(Given(current=policy(V1, RestartPolicy.ON_FAILURE)), probe(alive=False, code=0),
                 Then(F, f"{EXITED_1.replace('code 1', 'code 0')}; restart policy 'on-failure' does not "
                      "restart it",
                      failures=1, health=Health(alive=False)),
                 id="clean exit under on-failure: Failed, not restarted"),
    pytest.param(Given(current=policy(V1, RestartPolicy.NEVER), health=Health(misses=2)),
                 probe(healthy=False),
                 Then(U, "missed 3 health probes in a row on /healthz; restart policy 'never' does not "
                      "restart it", failures=1, health=Health(misses=3)),
                 id="unhealthy under never: Unhealthy, not restarted"),
    pytest.param(Given(current=V1, failures=4), probe(alive=False, code=1),
                 Then(F, f"crash loop: failed 5 times in a row; {EXITED_1}", failures=5,
                      restart_at=NOW + 16.0, health=Health(alive=False)),
                 id="crash loop of the only version: Failed, still restarted at the capped pace"),
    pytest.param(Given(current=V2, previous=V1, failures=4), probe(alive=False, code=1),
                 Then(F, LOOP_2, failures=5, restart_at=NOW + 16.0, health=Health(alive=False), current="2-i",
                      failed=("2",)),
                 id="crash loop of a new version, no standby: Failed, marked failed for the rollback"),
    pytest.param(Given(current=V2, previous=V1, failures=4, standby=V1, standby_alive=True),
                 probe(alive=False, code=1),
                 Then(F, f"version 2 failed: {LOOP_2}; rolled back to version 1, which keeps serving",
                      failures=0, current="1-standby", effects=(Retire, Watch), failed=("2",)),
                 id="crash loop of a new version while v1 stands by: v1 current again, v2 stopped"),
    pytest.param(Given(current=V2, previous=V1, failures=4, standby=V1, standby_alive=False),
                 probe(alive=False, code=1),
                 Then(F, LOOP_2, failures=5, restart_at=NOW + 16.0, health=Health(alive=False), current="2-i",
                      failed=("2",)),
                 id="crash loop while the standby is gone too: Failed, the standby forgotten"),
    pytest.param(Given(current=V2, previous=V1, failures=0, standby=V1, standby_alive=True),
                 probe(alive=False, code=1),
                 Then(U, f"{EXITED_2}; restarting in 1.0s", failures=1, restart_at=NOW + 1.0,
                      health=Health(alive=False), current="2-i", standby="1-standby"),
                 id="first crash of a new version: restarted, v1 keeps standing by"),
]  # fmt: skip


@pytest.mark.parametrize(("given", "result", "then"), PROBE_CASES)
def test_probe_results(given: Given, result: ProbeResult, then: Then) -> None:
    slot = given.slot()
    out = probed(slot, result, BOOM)
    service = out.slot.service
    assert (service.state, service.reason) == (then.state, then.reason)
    assert service.failures == then.failures
    assert out.slot.restart_at == then.restart_at
    assert out.slot.health == then.health
    assert service.current is not None and service.current.id == then.current
    assert (service.standby.id if service.standby else None) == then.standby
    assert set(service.failed) == {assignment_key(a) for a in (V1, V2) if a.version in then.failed}
    assert tuple(type(e) for e in out.effects if isinstance(e, Retire | Watch)) == then.effects
    assert slot == given.slot(), "the decision changed its input"
    if (service.state, service.reason) != (given.state, given.reason):
        assert _dirty(out).save and _dirty(out).report


def test_a_healthy_probe_starts_the_healthy_clock_and_a_miss_stops_it() -> None:
    slot = Given(healthy_for_s=None, state=T).slot()
    healthy = probed(slot, probe())
    assert healthy.slot.service.healthy_since == AT
    missed = probed(healthy.slot, probe(healthy=False))
    assert missed.slot.service.healthy_since is None


def test_an_exit_plans_again_and_a_crash_loop_retires_the_failed_version_at_once() -> None:
    given = Given(current=V2, previous=V1, failures=4, standby=V1, standby_alive=True, healthy_for_s=None)
    out = on_probe(given.slot(), probe(alive=False, code=1, iid="2-i"), log_lines=[], restart=RESTART,
                   now=NOW, wall=AT, rand=0.5)  # fmt: skip
    assert _dirty(out).plan
    retired = [e for e in out.effects if isinstance(e, Retire)]
    assert [(r.instance.id, r.grace_s) for r in retired] == [("2-i", 0.0)]
    assert out.slot.service.previous == V2 and out.slot.service.last_good == V1
    assert out.slot.settle_at is None


def _dirty(out: Outcome) -> Dirty:
    flags = [e for e in out.effects if isinstance(e, Dirty)]
    return Dirty(
        save=any(d.save for d in flags), report=any(d.report for d in flags), plan=any(d.plan for d in flags)
    )
