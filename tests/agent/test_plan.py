"""The agent's pure decisions as tables: the reconcile planner, restarts, backoff."""

from __future__ import annotations

import pytest

from edge_agent.backoff import RestartBackoff, full_jitter
from edge_agent.reconcile.plan import (
    Action,
    Observed,
    Op,
    Verdict,
    Wanted,
    assignment_key,
    plan,
    plan_service,
)
from edge_agent.reconcile.supervise import (
    CRASH_LOOP_LIMIT,
    Trouble,
    after_failure,
    judge_failure,
    should_restart,
)
from edge_agent.reconcile.supervise import Verdict as FailureKind
from manifests.desired import DeploymentSettings, ModuleAssignment, RestartPolicy
from manifests.errors import HubUnavailable, ModuleStartFailure, NotFoundError, TrustError, Unschedulable

V1 = ModuleAssignment(
    service="svc",
    module="m",
    version="1",
    manifest_digest="sha256:" + "1" * 64,
    settings=DeploymentSettings(port=9000),
)
V2 = V1.model_copy(update={"version": "2", "manifest_digest": "sha256:" + "2" * 64})
V1_OTHER_PORT = V1.model_copy(update={"settings": DeploymentSettings(port=9001)})
K1, K2 = assignment_key(V1), assignment_key(V2)


def want(a: ModuleAssignment, *, cached: bool = True, unschedulable: str | None = None) -> Wanted:
    return Wanted(assignment=a, key=assignment_key(a), cached=cached, unschedulable=unschedulable)


def running(key: str, *, alive: bool = True, **kw: object) -> Observed:
    return Observed(running_key=key, running_alive=alive, **kw)  # type: ignore[arg-type]


KEEP = (Verdict.KEEP, None, None)
WAIT = (Verdict.WAIT, None, None)
CANCEL = (Verdict.CANCEL, None, None)


@pytest.mark.parametrize(
    ("wanted", "seen", "expected"),
    [
        # nothing here yet
        (want(V1, cached=False), Observed(), (Verdict.RUN, Op.FETCH, V1)),
        (want(V1), Observed(), (Verdict.RUN, Op.START, V1)),
        # running what is wanted: nothing to do (applying the same state twice does nothing)
        (want(V1), running(K1), KEEP),
        # an update: fetch first, then start beside the old one and switch
        (want(V2, cached=False), running(K1), (Verdict.RUN, Op.FETCH, V2)),
        (want(V2), running(K1), (Verdict.RUN, Op.REPLACE, V2)),
        # a new port is a new assignment, replaced the same way
        (want(V1_OTHER_PORT), running(K1), (Verdict.RUN, Op.REPLACE, V1_OTHER_PORT)),
        # the old one died meanwhile: just start the new one
        (want(V2), running(K1, alive=False), (Verdict.RUN, Op.START, V2)),
        # operations under way for what is wanted run on; others give way at once
        (want(V2), Observed(running_key=K1, running_alive=True, op=Op.FETCH, op_key=K2), WAIT),
        (want(V2), Observed(op=Op.START, op_key=K2), WAIT),
        (want(V2), Observed(running_key=K1, running_alive=True, op=Op.REPLACE, op_key=K1), CANCEL),
        (want(V1), Observed(op=Op.FETCH, op_key=K2), CANCEL),
        # restarts of the wanted version: beside the old instance when it still answers
        (want(V1), running(K1, restart_due=True), (Verdict.RUN, Op.REPLACE, V1)),
        (want(V1), running(K1, alive=False, restart_due=True), (Verdict.RUN, Op.START, V1)),
        (want(V1), running(K1, alive=False), KEEP),  # backing off until the restart is due
        # a version that failed here is not tried again; the last good one keeps serving
        (want(V2), running(K1, failed_keys=frozenset({K2}), fallback=V1), KEEP),
        (want(V2), Observed(failed_keys=frozenset({K2})), KEEP),
        (want(V2), Observed(failed_keys=frozenset({K2}), fallback=V1), (Verdict.RUN, Op.START, V1)),
        (want(V2), running(K1, alive=False, restart_due=True, failed_keys=frozenset({K2}), fallback=V1),
         (Verdict.RUN, Op.START, V1)),
        (want(V2), running(K1, restart_due=True, failed_keys=frozenset({K2}), fallback=V1),
         (Verdict.RUN, Op.REPLACE, V1)),
        # cannot run here
        (want(V1, unschedulable="runtime docker is not enabled"), Observed(),
         (Verdict.REFUSE, None, None)),
        # no longer wanted
        (None, running(K1), (Verdict.RUN, Op.STOP, None)),
        (None, Observed(op=Op.FETCH, op_key=K1), CANCEL),
        (None, Observed(op=Op.STOP), WAIT),
        (None, Observed(), KEEP),
    ],
)  # fmt: skip
def test_planner_table(wanted: Wanted | None, seen: Observed, expected: tuple[object, ...]) -> None:
    action = plan_service("svc", wanted, seen)
    assert (action.verdict, action.op, action.assignment) == expected


def test_unschedulable_carries_its_reason() -> None:
    action = plan_service("svc", want(V1, unschedulable="needs 3 GB, 1 GB free"), Observed())
    assert action.reason == "needs 3 GB, 1 GB free"


def test_services_are_planned_independently_and_in_a_stable_order() -> None:
    wanted = {"b": want(V1.model_copy(update={"service": "b"}), cached=False), "a": want(V1)}
    observed = {"a": running(K1), "gone": running(K2)}
    actions = plan(wanted, observed)
    assert [(a.service, a.verdict, a.op) for a in actions] == [
        ("a", Verdict.KEEP, None),
        ("b", Verdict.RUN, Op.FETCH),
        ("gone", Verdict.RUN, Op.STOP),
    ]
    assert plan(wanted, observed) == actions, "the same inputs always give the same plan"
    assert all(isinstance(a, Action) for a in actions)


def test_assignment_key_changes_with_digest_and_settings_only() -> None:
    assert assignment_key(V1) == assignment_key(V1.model_copy())
    assert len({assignment_key(V1), assignment_key(V2), assignment_key(V1_OTHER_PORT)}) == 3


@pytest.mark.parametrize(
    ("policy", "trouble", "code", "restart"),
    [
        (RestartPolicy.ALWAYS, Trouble.EXITED, 0, True),
        (RestartPolicy.ALWAYS, Trouble.UNHEALTHY, None, True),
        (RestartPolicy.ON_FAILURE, Trouble.EXITED, 0, False),
        (RestartPolicy.ON_FAILURE, Trouble.EXITED, 1, True),
        (RestartPolicy.ON_FAILURE, Trouble.EXITED, -9, True),
        (RestartPolicy.ON_FAILURE, Trouble.UNHEALTHY, None, True),
        (RestartPolicy.NEVER, Trouble.EXITED, 1, False),
        (RestartPolicy.NEVER, Trouble.UNHEALTHY, None, False),
    ],
)
def test_restart_policy_table(
    policy: RestartPolicy, trouble: Trouble, code: int | None, restart: bool
) -> None:
    assert should_restart(policy, trouble, code) is restart


def test_restart_delays_double_to_300_s_with_20_percent_jitter() -> None:
    backoff = RestartBackoff()
    nominal = [backoff.delay(n, 0.5) for n in range(1, 12)]
    assert nominal[:5] == [1, 2, 4, 8, 16]
    assert nominal[-1] == 300 and max(nominal) == 300
    assert backoff.delay(3, 0.0) == pytest.approx(4 * 0.8)
    assert backoff.delay(3, 0.999999) == pytest.approx(4 * 1.2, rel=1e-5)


def test_failures_are_forgiven_after_ten_minutes_healthy_and_a_loop_ends_failed() -> None:
    args = {"policy": RestartPolicy.ALWAYS, "trouble": Trouble.EXITED, "exit_code": 1, "rand": 0.5}
    first = after_failure(failures_before=0, healthy_for_s=0, **args)  # type: ignore[arg-type]
    assert (first.failures, first.restart_in_s, first.crash_loop) == (1, 1.0, False)
    loop = after_failure(failures_before=CRASH_LOOP_LIMIT - 1, healthy_for_s=3, **args)  # type: ignore[arg-type]
    assert loop.crash_loop and loop.restart_in_s == 16.0
    fresh = after_failure(failures_before=40, healthy_for_s=601, **args)  # type: ignore[arg-type]
    assert (fresh.failures, fresh.restart_in_s, fresh.crash_loop) == (1, 1.0, False)
    never = after_failure(**{**args, "policy": RestartPolicy.NEVER}, failures_before=0, healthy_for_s=0)  # type: ignore[arg-type]
    assert never.restart_in_s is None


def test_full_jitter_stays_under_the_capped_exponential_and_spreads_a_fleet() -> None:
    assert full_jitter(0, 0.5) == 0.5
    assert full_jitter(3, 0.999) < 8
    assert full_jitter(100, 0.999) < 60 and full_jitter(100, 0.5) == 30
    # A thousand devices reconnecting on their 6th attempt do not arrive together.
    delays = sorted(full_jitter(6, i / 1000) for i in range(1000))
    assert delays[0] < 1 and delays[-1] > 59
    with pytest.raises(ValueError):
        full_jitter(1, 1.0)


@pytest.mark.parametrize(
    ("error", "starting", "ran_before", "verdict", "retry_after"),
    [
        pytest.param(Unschedulable("port 9000 is held"), True, False, FailureKind.UNSCHEDULABLE, None,
                     id="a port held by another program: Unschedulable"),
        pytest.param(HubUnavailable("hub down", retry_after_s=55), False, False, FailureKind.RETRY, 55,
                     id="the hub is away: retried, after what it asked"),
        pytest.param(FileNotFoundError("blob.partial"), False, False, FailureKind.RETRY, None,
                     id="an error outside edgepack's tree (a cache race): retried, never final"),
        pytest.param(RuntimeError("bug"), True, True, FailureKind.RETRY, None,
                     id="a bug while starting a version that ran before: retried"),
        pytest.param(ModuleStartFailure("init() failed"), True, True, FailureKind.CRASH, None,
                     id="a version that ran here before fails to start: a crash, restarted with backoff"),
        pytest.param(ModuleStartFailure("init() failed"), True, False, FailureKind.FINAL, None,
                     id="a new version fails to start: failed for good"),
        pytest.param(TrustError("digest mismatch"), False, False, FailureKind.FINAL, None,
                     id="bytes that do not match their digest: failed for good"),
        pytest.param(NotFoundError("gone"), False, False, FailureKind.FINAL, None,
                     id="the hub no longer has it: failed for good"),
    ],
)  # fmt: skip
def test_judge_failure(
    error: BaseException, starting: bool, ran_before: bool, verdict: FailureKind, retry_after: float | None
) -> None:
    judged = judge_failure(error, starting=starting, ran_here_before=ran_before)
    assert judged.verdict is verdict
    assert judged.retry_after_s == retry_after
    assert judged.reason
