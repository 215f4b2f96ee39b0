"""The reconcile loop's pure decisions (:mod:`edge_agent.reconcile.step`) as tables: a service's
records and an event in, the new records and the effects out. No agent, clock or runtime."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.cache.modules import InstalledModule
from edge_agent.download.module import Cancelled
from edge_agent.health import ProbeResult
from edge_agent.reconcile.events import HttpDesired, OpDone, OpProgress, Retired, Stop
from edge_agent.reconcile.plan import Op, assignment_key
from edge_agent.reconcile.step import (
    TOKEN_REFUSED_ERROR,
    Acceptance,
    AnswerLogs,
    Applied,
    Cancel,
    Collect,
    Context,
    Dirty,
    Dispatch,
    Finished,
    Forget,
    Halt,
    Health,
    Installed,
    Looked,
    OpView,
    Outcome,
    Records,
    Retire,
    RotateKeys,
    SaveDesired,
    Say,
    SettleDue,
    Slot,
    Watch,
    on_desired,
    on_op_done,
    on_probe,
    replan,
    restore,
    settle,
    step,
)
from edge_agent.state.records import AgentRecord, InstanceRecord, ServiceRecord
from edge_agent.uplink.http import DesiredFetch, TokenRefused
from edge_agent.uplink.mqtt import Connected, DesiredMessage, Disconnected, LogRequestMessage
from manifests.desired import DeploymentSettings, EndpointAuth, ModuleAssignment, RestartPolicy, RuntimeKind
from manifests.device import RestartSettings
from manifests.errors import HubUnavailable, ModuleStartFailure, Unschedulable
from manifests.reported import Progress
from manifests.states import ServiceState
from tests.factory import Forge

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
V3 = V1.model_copy(update={"version": "3", "manifest_digest": "sha256:" + "3" * 64})


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
    restarts: int = 0

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
                restarts=self.restarts,
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
EXITED_1 = "version 1 exited with code 1"
EXITED_2 = "version 2 exited with code 1"
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
                 id="exited: Unhealthy, restart after the backoff"),
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
                 Then(F, f"{LOOP_2}; rolled back to version 1, which keeps serving",
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
    # The one-line reason stays short; the output of an instance that exited is the detail of
    # a Failed service only.
    assert "\n" not in (service.reason or "") and "RuntimeError" not in (service.reason or "")
    exited = not result.alive and given.health.alive
    if service.state is F and exited:
        assert service.failure is not None and service.failure.log_tail == "Traceback\nRuntimeError: boom"
    else:
        assert service.failure is None


def test_a_failed_versions_traceback_and_output_stand_until_the_service_is_no_longer_failed() -> None:
    error = ModuleStartFailure(
        "score.py:4 RuntimeError: no weights",
        traceback='Traceback (most recent call last):\n  File "score.py", line 4\nRuntimeError: no weights',
        log_lines=["loading the weights", "\x1b[31mcoloured\x1b[0m"],
    )
    slot = replace(Given(target=V2).slot(), busy=True)
    out = on_op_done(slot, op(Op.REPLACE, V2, error=error), restart=RESTART, now=NOW, wall=AT, rand=0.5)
    service = out.slot.service
    assert service.state is F
    rollback = "rolled back to version 1, which keeps serving"
    assert service.reason == f"score.py:4 RuntimeError: no weights; {rollback}"
    assert service.failure is not None and service.failure.traceback is not None
    assert service.failure.traceback.endswith("RuntimeError: no weights")
    assert service.failure.log_tail == "loading the weights\ncoloured"
    # A probe of version 1, which keeps serving, leaves the failure as it is ...
    still = probed(out.slot, probe())
    assert still.slot.service.state is F and still.slot.service.failure == service.failure
    # ... and once the service is no longer Failed (its target moved back to v1) the detail goes.
    back = replace(still.slot, service=still.slot.service.model_copy(update={"target": V1}))
    healthy = settle(back, AT)
    assert healthy.slot.service.state is H and healthy.slot.service.failure is None


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


# --- operation results ------------------------------------------------------------------------------

SETTLE = RestartSettings(settle_s=30.0)
NO_SETTLE = RestartSettings(settle_s=0.0)
HUNG = "stopping the instance that stopped answering"


@dataclass(frozen=True)
class Ended:
    """What the slot and effects look like after an operation ended."""

    state: ServiceState
    reason: str | None
    current: str | None = "1-i"
    standby: str | None = None
    retired: tuple[tuple[str, float, bool], ...] = ()  # (instance, grace, killed)
    kinds: tuple[type, ...] = ()  # other effects that must be there
    failed: tuple[str, ...] = ()
    retry_at: float | None = None
    retry_attempts: int = 0
    unschedulable: tuple[str, str, float] | None = None
    settle_at: float | None = None
    restarts: int = 0


def op(kind: Op, a: ModuleAssignment | None, *, error: BaseException | None = None, result: object = None,
       restart: bool = False) -> Finished:  # fmt: skip
    return Finished(kind, assignment_key(a) if a else None, a, restart=restart, error=error, result=result)


MODULE = InstalledModule(dir=Path("/cache/v2"), manifest=None, manifest_digest=V2.manifest_digest)  # type: ignore[arg-type]
NOT_HERE = Unschedulable("runtime docker is not enabled on this device")
INIT_FAILED = ModuleStartFailure("init() failed: no weights")
NOTE_V1 = "; version 1 (process) keeps serving"

OP_CASES = [
    pytest.param(Given(target=V2, state=T), op(Op.FETCH, V2, result=MODULE),
                 SETTLE, Ended(T, None, kinds=(Installed,)),
                 id="fetch done: the module is installed, nothing else changes"),
    pytest.param(Given(), op(Op.STOP, None), SETTLE, Ended(H, None, kinds=(Forget,)),
                 id="stop done: the service is forgotten"),
    pytest.param(Given(), op(Op.STOP, None, error=RuntimeError("stuck")), SETTLE,
                 Ended(H, None, kinds=(Forget,)),
                 id="stop failed: forgotten all the same (the log says why)"),
    pytest.param(Given(target=V2, state=T, reason="downloading version 2"),
                 op(Op.FETCH, V2, error=Cancelled("cancelled")), SETTLE,
                 Ended(T, "downloading version 2"),
                 id="cancelled: nothing changes, the plan runs again"),
    pytest.param(Given(state=T), op(Op.START, V1, result=instance(V1, "new")), SETTLE,
                 Ended(H, None, current="1-new", retired=(("1-i", 20.0, False),), kinds=(Watch, Collect)),
                 id="started again beside an answering instance of the same version: the old one drains"),
    pytest.param(Given(target=V2, state=T), op(Op.REPLACE, V2, result=instance(V2)), SETTLE,
                 Ended(H, None, current="2-i", standby="1-i", settle_at=NOW + 30.0, kinds=(Watch, Collect)),
                 id="v2 replaces an answering v1: Healthy, v1 stands by until v2 settles"),
    pytest.param(Given(target=V2, state=T), op(Op.REPLACE, V2, result=instance(V2)), NO_SETTLE,
                 Ended(H, None, current="2-i", retired=(("1-i", 20.0, False),)),
                 id="v2 replaces v1 with no settle time: v1 drains and stops at once"),
    pytest.param(Given(state=U, health=Health(misses=3)),
                 op(Op.REPLACE, V1, result=instance(V1, "new"), restart=True), SETTLE,
                 Ended(T, HUNG, current="1-new", retired=(("1-i", 0.0, True),), restarts=1),
                 id="restart beside a hung instance: it is killed, not Healthy until it is gone (finding 2)"),
    pytest.param(Given(target=V1, current=V2, state=T, standby=V1),
                 op(Op.REPLACE, V1, result=instance(V1, "new")), SETTLE,
                 Ended(H, None, current="1-new", standby="2-i", retired=(("1-standby", 20.0, False),),
                       settle_at=NOW + 30.0),
                 id="the standby's version started anew: the old standby drains, the replaced one stands by"),
    pytest.param(Given(target=V2, state=T), op(Op.FETCH, V2, error=NOT_HERE), SETTLE,
                 Ended(ServiceState.UNSCHEDULABLE, f"{NOT_HERE}{NOTE_V1}",
                       unschedulable=(assignment_key(V2), str(NOT_HERE), NOW + 60.0)),
                 id="unschedulable: said with the version that keeps serving, looked at again in 60 s"),
    pytest.param(Given(target=V2, state=T), op(Op.FETCH, V2, error=HubUnavailable("hub answered 503",
                                                                                  retry_after_s=55.0)),
                 SETTLE, Ended(T, f"fetch of version 2: hub answered 503; retrying in 55s{NOTE_V1}",
                               retry_at=NOW + 55.0, retry_attempts=1),
                 id="temporary failure: retried after the hub's Retry-After, v1 serving"),
    pytest.param(Given(target=V2, state=T), op(Op.FETCH, V2, error=FileNotFoundError("x.partial")), SETTLE,
                 Ended(T, f"fetch of version 2: FileNotFoundError: x.partial; retrying in 0s{NOTE_V1}",
                       retry_at=NOW + 0.5, retry_attempts=1),
                 id="an unexpected error is never final: retried (finding 1)"),
    pytest.param(Given(target=V2, state=T), op(Op.REPLACE, V2, error=INIT_FAILED), SETTLE,
                 Ended(F, f"{INIT_FAILED}; rolled back to version 1, which keeps serving",
                       failed=("2",)),
                 id="a new version's init() fails: Failed for good, v1 keeps serving"),
    pytest.param(Given(state=U, health=Health(alive=False)), op(Op.START, V1, error=INIT_FAILED), SETTLE,
                 Ended(U, f"{INIT_FAILED}; restarting in 1.0s"),
                 id="a version that ran here fails to start again: a crash, restarted after the backoff"),
    pytest.param(Given(state=U, health=Health(alive=False), restarts=2),
                 op(Op.START, V1, error=INIT_FAILED, restart=True), SETTLE,
                 Ended(U, f"{INIT_FAILED}; restarting in 1.0s", restarts=3),
                 id="a restart that dies before it answers still counts as a restart"),
]  # fmt: skip


@pytest.mark.parametrize(("given", "done", "restart", "then"), OP_CASES)
def test_operation_results(given: Given, done: Finished, restart: RestartSettings, then: Ended) -> None:
    slot = replace(given.slot(), busy=True)
    out = on_op_done(slot, done, restart=restart, now=NOW, wall=AT, rand=0.5)
    service = out.slot.service
    assert (service.state, service.reason) == (then.state, then.reason)
    assert (service.current.id if service.current else None) == then.current
    assert (service.standby.id if service.standby else None) == then.standby
    retired = tuple((e.instance.id, e.grace_s, e.kill) for e in out.effects if isinstance(e, Retire))
    assert retired == then.retired
    kinds = {type(e) for e in out.effects}
    assert set(then.kinds) <= kinds
    assert set(service.failed) == {assignment_key(a) for a in (V1, V2) if a.version in then.failed}
    assert (out.slot.retry_at, out.slot.retry_attempts) == (then.retry_at, then.retry_attempts)
    assert out.slot.unschedulable == then.unschedulable
    assert out.slot.settle_at == then.settle_at
    assert service.restarts == then.restarts
    assert not out.slot.busy and service.progress is None
    assert _dirty(out) == Dirty(save=True, report=True, plan=True)
    assert slot == replace(given.slot(), busy=True), "the decision changed its input"


def test_a_started_version_is_last_good_and_its_predecessor_previous() -> None:
    out = on_op_done(Given(target=V2, failures=3).slot(), op(Op.REPLACE, V2, result=instance(V2)),
                     restart=SETTLE, now=NOW, wall=AT, rand=0.5)  # fmt: skip
    service = out.slot.service
    assert (service.last_good, service.previous, service.failures) == (V2, V1, 0)
    assert service.healthy_since == AT and out.slot.health == Health(alive=True)


# --- desired states -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forge() -> Forge:
    return Forge()


def accept(forge: Forge, applied: Applied, generation: int, modules: list[ModuleAssignment],
           source: str = "mqtt") -> tuple[bytes, Acceptance]:  # fmt: skip
    payload = forge.desired_bytes(forge.desired_state("device-1", generation, modules))
    out = on_desired(applied, payload, source, hub_trust=forge.hub_trust, device_id="device-1", wall=AT)
    return payload, out


def records(*services: ServiceRecord, generation: int = 0) -> AgentRecord:
    return AgentRecord(
        device_id="device-1", applied_generation=generation, services={s.name: s for s in services}
    )


def test_a_new_desired_state_sets_each_target_and_is_saved_first(forge: Forge) -> None:
    payload, out = accept(forge, Applied(records()), 1, [V1])
    assert isinstance(out.effects[0], SaveDesired) and out.effects[0].payload == payload
    record = out.applied.record
    assert (record.applied_generation, record.applied_at, record.last_error) == (1, AT, None)
    assert record.services["good"].target == V1 and record.services["good"].since == AT
    assert out.applied.payload == payload and out.applied.desired is not None
    assert _dirty_of(out.effects) == Dirty(save=True, report=True, plan=True)


def test_the_same_bytes_again_change_nothing(forge: Forge) -> None:
    payload, out = accept(forge, Applied(records()), 1, [V1])
    again = on_desired(out.applied, payload, "mqtt", hub_trust=forge.hub_trust, device_id="device-1", wall=AT)
    assert again == Acceptance(out.applied)


@pytest.mark.parametrize(
    ("source", "generation", "refused"),
    [
        pytest.param("mqtt", 5, False, id="the applied generation redelivered: dropped silently"),
        pytest.param("http", 4, False, id="an older state from a poll: stale, dropped without a refusal"),
        pytest.param("mqtt", 4, True, id="an older state over MQTT: a replay, refused and reported"),
    ],
)
def test_not_newer_states(forge: Forge, source: str, generation: int, refused: bool) -> None:
    applied = Applied(records(generation=5))
    _, out = accept(forge, applied, generation, [V1], source)
    assert out.applied.record.applied_generation == 5
    assert not any(isinstance(e, SaveDesired) for e in out.effects)
    error = out.applied.record.last_error
    assert (error is not None and "not-newer" in error) is refused
    assert _dirty_of(out.effects).report is refused


def test_a_forged_state_is_refused_and_reported(forge: Forge) -> None:
    state = forge.desired_state("device-1", 1, [V1])
    payload = forge.desired_bytes(state, key=Forge().hub)  # another hub's key
    out = on_desired(
        Applied(records()), payload, "mqtt", hub_trust=forge.hub_trust, device_id="device-1", wall=AT
    )
    assert out.applied.record.applied_generation == 0 and out.applied.record.last_error
    assert "refused" in out.applied.record.last_error
    assert _dirty_of(out.effects) == Dirty(save=True, report=True)


def test_a_new_target_resets_the_retry_timer_of_the_one_it_replaces(forge: Forge) -> None:
    # finding 4: a new target (v3) must not wait out the retry timer of v2
    service = ServiceRecord(name="good", since=AT, current=instance(V1), target=V2, state=T)
    applied = Applied(records(service, generation=1), retry_at={"good": NOW + 55}, retry_attempts={"good": 3})
    _, out = accept(forge, applied, 2, [V3])
    assert dict(out.applied.retry_at) == {} and dict(out.applied.retry_attempts) == {}
    same = Applied(records(service, generation=1), retry_at={"good": NOW + 55}, retry_attempts={"good": 3})
    _, kept = accept(forge, same, 2, [V2])
    assert dict(kept.applied.retry_at) == {"good": NOW + 55} and dict(kept.applied.retry_attempts) == {
        "good": 3
    }


@pytest.mark.parametrize(
    ("current", "previous_target", "new_target", "state"),
    [
        pytest.param(V1, V2, V1, H, id="reverted to the version that kept serving: Healthy again"),
        pytest.param(V2, V2, V1, F, id="the serving version itself failed: stays Failed"),
        pytest.param(V1, V2, V3, F,
                     id="moved on to a third version: stays Failed until that one serves"),
    ],
)  # fmt: skip
def test_back_to_the_serving_version_after_a_failed_release(
    forge: Forge, current: ModuleAssignment, previous_target: ModuleAssignment, new_target: ModuleAssignment,
    state: ServiceState,
) -> None:  # fmt: skip
    service = ServiceRecord(
        name="good", since=AT - timedelta(hours=1), current=instance(current), target=previous_target,
        state=F, reason="version 2 failed: crash loop",
    )  # fmt: skip
    _, out = accept(forge, Applied(records(service, generation=1)), 2, [new_target])
    got = out.applied.record.services["good"]
    assert got.state is state and got.target == new_target
    assert (got.since == AT) is (state is not F)


def test_new_endpoint_keys_for_the_running_version_are_rotated_without_a_restart(forge: Forge) -> None:
    def keys(k: str) -> ModuleAssignment:
        return V1.model_copy(
            update={"settings": V1.settings.model_copy(update={"auth": EndpointAuth(key_sha256=[k * 64])})}
        )

    old, keyed = keys("a"), keys("b")
    service = ServiceRecord(name="good", since=AT, current=instance(old), target=old)
    _, out = accept(forge, Applied(records(service, generation=1)), 2, [keyed])
    rotations = [e for e in out.effects if isinstance(e, RotateKeys)]
    assert [(r.instance.id, r.auth) for r in rotations] == [("1-i", keyed.settings.auth)]
    current = out.applied.record.services["good"].current
    assert current is not None and current.assignment == keyed and current.id == "1-i"


def _dirty_of(effects: tuple[object, ...]) -> Dirty:
    flags = [e for e in effects if isinstance(e, Dirty)]
    return Dirty(
        save=any(d.save for d in flags), report=any(d.report for d in flags), plan=any(d.plan for d in flags)
    )


# --- one step over all the records, for every event type ---------------------------------------------


def ctx(forge: Forge) -> Context:
    return Context(device_id="device-1", hub_trust=forge.hub_trust, restart=SETTLE, poll_interval_s=60.0)


def serving(a: ModuleAssignment = V1, **fields: object) -> Records:
    """Records of a device where service ``good`` runs ``a`` healthily, as its target."""
    service = ServiceRecord(name="good", since=AT, current=instance(a), last_good=a, target=a, state=H,
                            healthy_since=AT - timedelta(seconds=5))  # fmt: skip
    base = Records(agent=records(service, generation=1), health={instance(a).id: Health()})
    return replace(base, **fields)  # type: ignore[arg-type]


def stepped(
    forge: Forge, before: Records, event: object, looked: Looked = Looked()
) -> tuple[Records, tuple[object, ...]]:
    return step(before, event, ctx=ctx(forge), now=NOW, wall=AT, rand=0.5, looked=looked)  # type: ignore[arg-type]


FETCH_V2 = OpView(7, Op.FETCH, assignment_key(V2), V2)


def test_step_a_desired_state_over_mqtt_sets_the_targets_and_is_saved(forge: Forge) -> None:
    payload = forge.desired_bytes(forge.desired_state("device-1", 2, [V2]))
    after, effects = stepped(forge, serving(), DesiredMessage(payload))
    assert after.agent.services["good"].target == V2 and after.payload == payload
    assert after.agent.applied_generation == 2 and SaveDesired(payload) in effects


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(Connected(session_present=False), {"next_poll": NOW}, id="connected: poll at once"),
        pytest.param(Disconnected(reason="broker gone"), {}, id="disconnected: nothing changes"),
        pytest.param(HttpDesired(fetch=None, error=HubUnavailable("503")),
                     {"poll_attempts": 4, "next_poll": NOW + 4.0, "poll_in_flight": False},
                     id="poll failed: polled again after a jittered backoff"),
        pytest.param(HttpDesired(fetch=DesiredFetch(data=None, etag='"g1"')),
                     {"poll_attempts": 0, "next_poll": NOW + 60.0, "etag": '"g1"', "poll_in_flight": False},
                     id="poll answered 304: the next poll after the interval, the etag kept"),
    ],
)  # fmt: skip
def test_step_connection_and_poll_events(forge: Forge, event: object, expected: dict[str, object]) -> None:
    before = serving(poll_attempts=3, poll_in_flight=True)
    after, effects = stepped(forge, before, event)
    assert after == replace(before, **expected)  # type: ignore[arg-type]
    assert all(isinstance(e, Dirty | Say) for e in effects)


@pytest.mark.parametrize(
    ("last_error", "reported"),
    [
        pytest.param(None, True, id="the first refused poll: the last error says so, reported"),
        pytest.param(TOKEN_REFUSED_ERROR, False, id="each later one: nothing new to report"),
        pytest.param("something else", True, id="it replaces another error, reported"),
    ],
)
def test_step_a_refused_token_is_the_last_error_once_and_each_poll_a_debug_line(
    forge: Forge, last_error: str | None, reported: bool
) -> None:
    before = serving(poll_attempts=3, poll_in_flight=True)
    before = replace(before, agent=before.agent.model_copy(update={"last_error": last_error}))
    after, effects = stepped(forge, before, HttpDesired(fetch=None, error=TokenRefused("refused")))
    assert after.agent.last_error == TOKEN_REFUSED_ERROR
    assert (after.poll_attempts, after.next_poll, after.poll_in_flight) == (4, NOW + 4.0, False)
    said = [e for e in effects if isinstance(e, Say)]
    assert [s.level for s in said] == [logging.DEBUG]
    assert any(isinstance(e, Dirty) and e.report for e in effects) is reported


def test_step_a_token_taken_again_clears_the_refusal(forge: Forge) -> None:
    before = serving()
    before = replace(before, agent=before.agent.model_copy(update={"last_error": TOKEN_REFUSED_ERROR}))
    after, effects = stepped(forge, before, HttpDesired(fetch=DesiredFetch(data=None, etag='"g1"')))
    assert after.agent.last_error is None and Dirty(save=True, report=True) in effects


def test_step_a_poll_with_a_new_state_is_taken_as_a_desired_state_over_http(forge: Forge) -> None:
    payload = forge.desired_bytes(forge.desired_state("device-1", 2, [V2]))
    after, effects = stepped(forge, serving(), HttpDesired(fetch=DesiredFetch(data=payload, etag='"g2"')))
    assert after.agent.services["good"].target == V2 and after.etag == '"g2"'
    assert SaveDesired(payload) in effects


def test_step_operation_done_ends_the_operation_and_applies_its_result(forge: Forge) -> None:
    before = serving(ops={"good": FETCH_V2})
    stale, effects = stepped(forge, before, OpDone("good", 6, result=MODULE))
    assert (stale, effects) == (before, ())
    after, effects = stepped(forge, before, OpDone("good", 7, result=MODULE))
    assert "good" not in after.ops and Installed(MODULE) in effects


def test_step_progress_is_kept_and_reported_at_most_every_two_seconds(forge: Forge) -> None:
    before = serving(ops={"good": FETCH_V2})
    progress = Progress(phase="download", done_bytes=10, total_bytes=100)
    after, effects = stepped(forge, before, OpProgress("good", 7, progress))
    assert after.agent.services["good"].progress == progress and Dirty(report=True) in effects
    _, effects = stepped(forge, after, OpProgress("good", 7, progress))
    assert effects == ()
    stale, effects = stepped(forge, before, OpProgress("good", 6, progress))
    assert (stale, effects) == (before, ())


def test_step_a_probe_of_an_exited_instance_schedules_its_restart(forge: Forge) -> None:
    after, effects = stepped(forge, serving(), probe(alive=False, code=1, iid="1-i"), Looked(tuple(BOOM)))
    assert after.health["1-i"] == Health(alive=False) and after.restart_at == {"good": NOW + 1.0}
    assert after.agent.services["good"].state is U and Dirty(plan=True) in effects
    ignored, effects = stepped(forge, serving(), probe(alive=False, iid="0-old"))
    assert (ignored, effects) == (serving(), ())


def test_step_an_instance_that_ends_while_a_start_replaces_it_is_judged_after_the_start(forge: Forge) -> None:
    # A move from the process to the docker runtime stops the serving process before the
    # container starts; the prober saw it gone and a restart was scheduled beside the new
    # instance (two containers of one version, bare-box run).
    moving = serving(ops={"good": OpView(8, Op.REPLACE, assignment_key(V1), V1, True)})
    after, effects = stepped(forge, moving, probe(alive=False, code=0, iid="1-i"), Looked(tuple(BOOM)))
    assert (after, effects) == (moving, ())
    # The start failed and handed the service back: the next probe counts the exit.
    failure = ModuleStartFailure("the container did not start")
    done, _ = stepped(forge, moving, OpDone("good", 8, error=failure))
    judged, _ = stepped(forge, done, probe(alive=False, code=0, iid="1-i"), Looked(tuple(BOOM)))
    assert judged.health["1-i"] == Health(alive=False) and "good" in judged.restart_at
    # A download under way is no start: a crash while it runs is judged at once.
    fetching = serving(ops={"good": FETCH_V2})
    crashed, _ = stepped(forge, fetching, probe(alive=False, code=1, iid="1-i"), Looked(tuple(BOOM)))
    assert crashed.restart_at == {"good": NOW + 1.0}


def test_step_a_log_request_is_answered_and_stop_halts(forge: Forge) -> None:
    assert stepped(forge, serving(), LogRequestMessage(b"{}")) == (serving(), (AnswerLogs(b"{}"),))
    assert stepped(forge, serving(), Stop()) == (serving(), (Halt(),))


def test_step_retired_instances_are_forgotten_and_a_killed_ones_successor_is_healthy(forge: Forge) -> None:
    old = instance(V1, "old")
    drained = serving(retiring={"1-old": ("good", old)}, health={"1-i": Health(), "1-old": Health()})
    after, effects = stepped(forge, drained, Retired("1-old"))
    assert after.retiring == {} and "1-old" not in after.health and effects == (Collect(),)
    # finding 2: Healthy only once the instance that stopped answering is gone
    hung = replace(drained, killing=frozenset({"1-old"}))
    hung = replace(
        hung, agent=records(hung.agent.services["good"].model_copy(update={"state": T, "reason": HUNG}))
    )
    after, effects = stepped(forge, hung, Retired("1-old"))
    assert after.killing == frozenset() and after.agent.services["good"].state is H


def test_step_the_settle_timer_stops_the_standby_once_the_new_version_settled(forge: Forge) -> None:
    service = ServiceRecord(
        name="good", since=AT, current=instance(V2), standby=instance(V1, "standby"), last_good=V2, target=V2,
        state=H, healthy_since=AT - timedelta(seconds=31),
    )  # fmt: skip
    before = Records(agent=records(service), health={"2-i": Health(), "1-standby": Health()})
    after, effects = stepped(forge, before, SettleDue("good"))
    assert after.agent.services["good"].standby is None and "1-standby" in after.retiring
    assert [(e.instance.id, e.grace_s) for e in effects if isinstance(e, Retire)] == [("1-standby", 20.0)]
    early = replace(
        before, agent=records(service.model_copy(update={"healthy_since": AT - timedelta(seconds=10)}))
    )
    after, effects = stepped(forge, early, SettleDue("good"))
    assert after.settle_at == {"good": NOW + 20.0} and after.agent.services["good"].standby is not None


# --- planning ------------------------------------------------------------------------------------------


def planned(
    before: Records, cached: bool = False, runtimes: frozenset[str] = frozenset({"process"})
) -> tuple[Records, tuple[object, ...]]:
    modules = before.desired.modules if before.desired else []
    return replan(
        before, cached={a.manifest_digest: cached for a in modules}, runtimes=runtimes, now=NOW, wall=AT
    )


def wanting(forge: Forge, *modules: ModuleAssignment, **fields: object) -> Records:
    """Records of a device whose desired state asks for ``modules`` and that runs nothing."""
    state = forge.desired_state("device-1", 1, list(modules))
    services = {a.service: ServiceRecord(name=a.service, since=AT, target=a) for a in modules}
    agent = AgentRecord(device_id="device-1", applied_generation=1, services=services)
    return replace(Records(agent=agent, desired=state), **fields)  # type: ignore[arg-type]


def dispatched(effects: tuple[object, ...]) -> list[tuple[str, Op, int]]:
    return [(e.service, e.op.kind, e.op.id) for e in effects if isinstance(e, Dispatch)]


def test_plan_a_new_service_is_downloaded_then_started(forge: Forge) -> None:
    after, effects = planned(wanting(forge, V1))
    assert dispatched(effects) == [("good", Op.FETCH, 1)] and after.next_op_id == 1
    assert after.ops["good"].kind is Op.FETCH
    assert (after.agent.services["good"].state, after.agent.services["good"].reason) == (
        T,
        "downloading version 1",
    )
    after, effects = planned(wanting(forge, V1), cached=True)
    assert dispatched(effects) == [("good", Op.START, 1)]
    assert after.agent.services["good"].reason == "starting version 1"


def test_plan_a_retry_timer_holds_the_operation_back(forge: Forge) -> None:
    before = wanting(forge, V1, retry_at={"good": NOW + 5})
    after, effects = planned(before)
    assert (after, effects) == (before, ())


def test_plan_a_runtime_the_device_lacks_is_unschedulable_naming_what_is_enabled(forge: Forge) -> None:
    docker = V1.model_copy(update={"settings": DeploymentSettings(port=9000, runtime=RuntimeKind.DOCKER)})
    after, effects = planned(wanting(forge, docker), cached=True)
    service = after.agent.services["good"]
    assert service.state is ServiceState.UNSCHEDULABLE and dispatched(effects) == []
    assert (
        service.reason is not None
        and "runtime docker is not enabled on this device (enabled: process)" in service.reason
    )


def test_plan_a_service_no_longer_wanted_and_not_running_is_forgotten(forge: Forge) -> None:
    before = wanting(forge)
    gone = ServiceRecord(name="gone", since=AT)
    before = replace(
        before, agent=before.agent.model_copy(update={"services": {"gone": gone}}), retry_at={"gone": 1.0}
    )
    after, effects = planned(before)
    assert "gone" not in after.agent.services and after.retry_at == {} and Forget("gone") in effects


def test_plan_an_operation_for_a_target_that_moved_on_is_cancelled(forge: Forge) -> None:
    before = wanting(forge, V2, ops={"good": OpView(3, Op.FETCH, assignment_key(V1), V1)})
    _, effects = planned(before)
    assert Cancel("good") in effects


def test_plan_a_rollback_start_keeps_saying_why_the_target_failed(forge: Forge) -> None:
    why = "init() failed"
    before = wanting(forge, V2)
    service = before.agent.services["good"].model_copy(
        update={"state": F, "reason": why, "failed": {assignment_key(V2): "init() failed"}, "last_good": V1}
    )
    before = replace(before, agent=before.agent.model_copy(update={"services": {"good": service}}))
    after, effects = planned(before, cached=True)
    assert dispatched(effects) == [("good", Op.START, 1)] and after.ops["good"].assignment == V1
    assert (after.agent.services["good"].state, after.agent.services["good"].reason) == (F, why)


# --- boot ----------------------------------------------------------------------------------------------


def test_boot_restores_the_saved_desired_state_even_once_expired(forge: Forge) -> None:
    payload = forge.desired_bytes(forge.desired_state("device-1", 3, [V1]))
    before = Records(agent=AgentRecord(device_id="device-1", applied_generation=3))
    later = datetime.now(UTC) + timedelta(days=3650)  # long after it expired; as of when it was applied
    after, effects = restore(before, payload, ctx=ctx(forge), wall=later)
    assert effects == () and after.payload == payload and after.agent.services["good"].target == V1


@pytest.mark.parametrize(
    ("payload", "applied", "says"),
    [
        pytest.param(b"{not json", 0, "damaged", id="damaged bytes: left aside"),
        pytest.param(None, 4, "older than the applied 4", id="older than the applied generation: left aside"),
        pytest.param("foreign", 0, "no longer verifies", id="signed by another hub: left aside"),
    ],
)
def test_boot_leaves_a_saved_desired_state_aside_when_it_cannot_be_trusted(
    forge: Forge, payload: bytes | str | None, applied: int, says: str
) -> None:
    state = forge.desired_state("device-1", 3, [V1])
    if payload is None:
        payload = forge.desired_bytes(state)
    elif payload == "foreign":
        payload = forge.desired_bytes(state, key=Forge().hub)
    before = Records(agent=AgentRecord(device_id="device-1", applied_generation=applied))
    assert isinstance(payload, bytes)
    after, effects = restore(before, payload, ctx=ctx(forge), wall=AT)
    assert after == before
    assert [e.text for e in effects if isinstance(e, Say)] and says in effects[0].text  # type: ignore[union-attr]
