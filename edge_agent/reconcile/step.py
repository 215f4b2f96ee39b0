"""The reconcile loop's decisions about one service, as data (pure).

Each decision takes what the loop knows of a service (a :class:`Slot`: its record, the health
of its serving instance, its timers) and an event, and returns the new slot and the
:data:`Effect` values the loop hands on (an instance to retire, the prober to re-point, a log
line, what became dirty). Nothing here reads a clock, a file or a runtime: the caller passes
``now`` (monotonic), ``wall`` (UTC) and ``rand``, and anything it looked up for the decision
(a log tail, whether the standby is still alive). So every case is a table row in
``tests/agent/test_step.py``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from edge_agent.backoff import RestartBackoff, full_jitter
from edge_agent.cache.modules import InstalledModule
from edge_agent.download.module import Cancelled
from edge_agent.health import ProbeResult
from edge_agent.reconcile.events import Event, HttpDesired, OpDone, OpProgress, Retired, Stop
from edge_agent.reconcile.plan import Observed, Op, Verdict, Wanted, assignment_key, plan
from edge_agent.reconcile.steady import steady_state
from edge_agent.reconcile.supervise import Trouble, after_failure, judge_failure
from edge_agent.reconcile.supervise import Verdict as FailureKind
from edge_agent.state.records import AgentRecord, InstanceRecord, ServiceRecord
from edge_agent.uplink.http import TokenRefused
from edge_agent.uplink.mqtt import Connected, DesiredMessage, Disconnected, LogRequestMessage
from manifests.desired import (
    DesiredRefusal,
    DesiredState,
    DesiredStateRefused,
    EndpointAuth,
    ModuleAssignment,
    verify_desired,
)
from manifests.device import RestartSettings
from manifests.errors import EdgepackError
from manifests.reported import FailureDetail
from manifests.signing import TrustStore
from manifests.states import ServiceState

#: how long a module that is stopped gets to finish what it does, and to drain its connections
STOP_GRACE_S = 10.0
DRAIN_S = 10.0
#: how long an Unschedulable verdict stands before it is checked again
UNSCHEDULABLE_RECHECK_S = 60.0


@dataclass(frozen=True)
class Health:
    """What the loop tracks of a serving instance between probe results."""

    alive: bool = True
    misses: int = 0


@dataclass(frozen=True)
class Slot:
    """What the decisions see of one service.

    ``health``: of the current instance. ``standby_alive``: the standby answers (the caller
    checked its process or container). ``busy``: an operation holds the service. ``killing``:
    an instance of it that stopped answering is being killed (until it is gone, the kernel may
    hand it connections, so the service is not called Healthy). The timers: when to restart
    the current instance, when the standby may stop, when to try a failed operation again
    (after ``retry_attempts``), and an Unschedulable verdict (assignment key, why, until).
    """

    service: ServiceRecord
    health: Health = Health()
    standby_alive: bool = False
    restart_at: float | None = None
    settle_at: float | None = None
    busy: bool = False
    killing: bool = False
    retry_at: float | None = None
    retry_attempts: int = 0
    unschedulable: tuple[str, str, float] | None = None


# --- effects -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retire:
    """Stop ``instance`` (it no longer serves) after ``grace_s`` of draining; ``kill``: it
    stopped answering, and its service is not Healthy until it is gone."""

    service: str
    instance: InstanceRecord
    grace_s: float
    kill: bool = False


@dataclass(frozen=True)
class Forget:
    """The service is gone: its records, timers and health go too."""

    service: str


@dataclass(frozen=True)
class Installed:
    """A module was fetched and verified: it is in the cache."""

    module: InstalledModule


@dataclass(frozen=True)
class Collect:
    """What may be deleted changed: garbage collection runs once nothing downloads."""


@dataclass(frozen=True)
class SaveDesired:
    """The verified desired state's bytes, to be saved before anything is done by them."""

    payload: bytes


@dataclass(frozen=True)
class RotateKeys:
    """New endpoint keys for a running instance: its keys file is rewritten, no restart."""

    service: str
    instance: InstanceRecord
    auth: EndpointAuth | None


@dataclass(frozen=True)
class Watch:
    """The serving instances changed: the prober follows."""


@dataclass(frozen=True)
class Say:
    """A line for the agent's log (``error``: an unexpected one, logged with its traceback)."""

    level: int
    text: str
    error: BaseException | None = None


@dataclass(frozen=True)
class Dirty:
    """What must happen after this batch of events: save, report, plan again."""

    save: bool = False
    report: bool = False
    plan: bool = False


Effect = Retire | Watch | Say | Dirty | Forget | Installed | Collect | SaveDesired | RotateKeys


@dataclass(frozen=True)
class Outcome:
    slot: Slot
    effects: tuple[Effect, ...] = ()


# --- helpers -------------------------------------------------------------------------------------


#: ``_status``'s default: the failure detail the service holds stands (while it stays Failed)
_KEEP = object()


def _status(
    service: ServiceRecord,
    state: ServiceState,
    reason: str | None,
    wall: datetime,
    failure: FailureDetail | object | None = _KEEP,
) -> tuple[ServiceRecord, list[Effect]]:
    """``service`` in ``state`` for ``reason`` (its ``since`` moves when the state changes);
    ``failure`` is the detail of a new failure. A detail is kept only while Failed."""
    effects: list[Effect] = [Dirty(save=True, report=True)]
    update: dict[str, object] = {"state": state, "reason": reason}
    if state is not ServiceState.FAILED:
        update["failure"] = None
    elif failure is not _KEEP:
        update["failure"] = failure
    if service.state is not state:
        update["since"] = wall
        effects.append(Say(logging.INFO, f"{service.name} is {state.value}{f': {reason}' if reason else ''}"))
    return service.model_copy(update=update), effects


def steady(slot: Slot) -> tuple[ServiceState, str | None]:
    """The state of a service that is not in the middle of anything."""
    service = slot.service
    return steady_state(
        target=service.target,
        current=service.current,
        serving=service.current is not None and slot.health.alive,
        failed=service.failed,
        state=service.state,
        reason=service.reason,
    )


def settle(slot: Slot, wall: datetime) -> Outcome:
    """The steady state of a service that no operation holds (after its last change)."""
    if slot.busy or slot.killing:
        return Outcome(slot)
    state, reason = steady(slot)
    if state is slot.service.state and reason == slot.service.reason:
        return Outcome(slot)
    service, effects = _status(slot.service, state, reason, wall)
    return Outcome(replace(slot, service=service), tuple(effects))


def _healthy_for(service: ServiceRecord, wall: datetime) -> float:
    since = service.healthy_since
    return (wall - since).total_seconds() if since is not None else 0.0


# --- probe results and the restart policy ---------------------------------------------------------


def on_probe(
    slot: Slot,
    result: ProbeResult,
    *,
    log_lines: list[str],
    restart: RestartSettings,
    now: float,
    wall: datetime,
    rand: float,
) -> Outcome:
    """A probe of the service's current instance answered (``log_lines``: its last lines, for
    a reason when it exited)."""
    service = slot.service
    current = service.current
    if current is None or current.id != result.instance_id:
        return Outcome(slot)  # an instance that no longer serves
    health = slot.health
    if not result.alive:
        if not health.alive:
            return Outcome(slot)  # known already (found dead at boot): its restart is under way
        code = "unknown" if result.exit_code is None else str(result.exit_code)
        reason = f"version {current.version} exited with code {code}"
        failure = FailureDetail.of(traceback=None, log_lines=log_lines) if log_lines else None
        dead = replace(slot, health=replace(health, alive=False))
        out = count_failure(
            dead, Trouble.EXITED, result.exit_code, reason, restart=restart, now=now, wall=wall, rand=rand,
            failure=failure,
        )  # fmt: skip
        return Outcome(out.slot, (Dirty(plan=True), *out.effects))
    if result.healthy:
        effects: list[Effect] = []
        healthy_since = service.healthy_since or wall
        failures = service.failures
        if (wall - healthy_since).total_seconds() >= restart.reset_after_s and failures:
            failures = 0
            effects.append(Dirty(save=True))
        service = service.model_copy(update={"healthy_since": healthy_since, "failures": failures})
        slot = replace(slot, service=service, health=replace(health, misses=0))
        if service.state is not ServiceState.HEALTHY:
            settled = settle(slot, wall)
            return Outcome(settled.slot, (*effects, *settled.effects))
        return Outcome(slot, tuple(effects))
    misses = health.misses + 1
    slot = replace(
        slot,
        service=service.model_copy(update={"healthy_since": None}),
        health=replace(health, misses=misses),
    )
    probe = current.assignment.settings.health
    if misses != probe.failure_threshold:
        return Outcome(slot)
    reason = f"missed {misses} health probes in a row on {probe.path}"
    return count_failure(
        slot, Trouble.UNHEALTHY, None, reason, restart=restart, now=now, wall=wall, rand=rand
    )


def count_failure(
    slot: Slot,
    trouble: Trouble,
    exit_code: int | None,
    reason: str,
    *,
    restart: RestartSettings,
    now: float,
    wall: datetime,
    rand: float,
    failure: FailureDetail | None = None,
) -> Outcome:
    """One more failure of the current instance: the restart policy and its backoff, and a
    crash loop that ends in Failed (with ``failure``, its output) or hands back to the standby
    that kept serving."""
    service = slot.service
    current = service.current
    assert current is not None
    decision = after_failure(
        policy=current.assignment.settings.restart_policy,
        trouble=trouble,
        exit_code=exit_code,
        failures_before=service.failures,
        healthy_for_s=_healthy_for(service, wall),
        rand=rand,
        backoff=RestartBackoff(restart.base_s, restart.cap_s, restart.jitter, restart.reset_after_s),
        limit=restart.crash_loop_limit,
    )
    service = service.model_copy(update={"failures": decision.failures, "healthy_since": None})
    restart_at = now + decision.restart_in_s if decision.restart_in_s is not None else slot.restart_at
    # the new version has not settled
    slot = replace(slot, service=service, restart_at=restart_at, settle_at=None)
    effects: list[Effect] = [Dirty(save=True, report=True, plan=True)]
    if decision.crash_loop:
        text = f"crash loop: failed {decision.failures} times in a row; {reason}"
        earlier = service.previous
        if earlier is not None and assignment_key(earlier) != current.key:
            # The version that served before goes back to serving (see the planner's fallback).
            failed = {**service.failed, current.key: text}
            slot = replace(slot, service=service.model_copy(update={"failed": failed}))
        # Kept while the service stays Failed, also when the standby takes over again.
        slot = replace(slot, service=slot.service.model_copy(update={"failure": failure}))
        promoted = promote_standby(slot, wall)
        if promoted is not None:
            return Outcome(promoted.slot, (*effects, *promoted.effects))
        standby = slot.service.standby
        if standby is not None and standby.key not in slot.service.failed:
            # It no longer answers: it cannot take over, and it is forgotten.
            slot = replace(slot, service=slot.service.model_copy(update={"standby": None}))
        state, why = ServiceState.FAILED, text
    elif decision.restart_in_s is None:
        policy = current.assignment.settings.restart_policy
        state = ServiceState.UNHEALTHY if trouble is Trouble.UNHEALTHY else ServiceState.FAILED
        why = f"{reason}; restart policy '{policy}' does not restart it"
    else:
        state, why = ServiceState.UNHEALTHY, f"{reason}; restarting in {decision.restart_in_s:.1f}s"
    service, said = _status(slot.service, state, why, wall, failure)
    return Outcome(replace(slot, service=service), (*effects, *said))


def promote_standby(slot: Slot, wall: datetime) -> Outcome | None:
    """A new version crash-loops while the last good instance still serves beside it: that
    one becomes current again (no restart), and the failed one is stopped. None when there is
    no standby that can take over."""
    service = slot.service
    standby, failed = service.standby, service.current
    if standby is None or failed is None or standby.key in service.failed or not slot.standby_alive:
        return None
    service = service.model_copy(
        update={
            "standby": None,
            "current": standby,
            "last_good": standby.assignment,
            "previous": failed.assignment,
            "failures": 0,
        }
    )
    slot = replace(slot, service=service, health=Health(alive=True), standby_alive=False, restart_at=None)
    effects: list[Effect] = [
        Retire(service.name, failed, 0.0),
        Watch(),
        Say(
            logging.INFO,
            f"{service.name}: version {failed.version} crash-loops; version {standby.version}, "
            "which kept serving, is current again",
        ),
    ]
    state, reason = steady(slot)
    service, said = _status(slot.service, state, reason, wall)
    return Outcome(replace(slot, service=service), (*effects, *said))


def serving_note(slot: Slot, reason: str | None) -> str | None:
    """``reason``, saying which version serves meanwhile when it is not the target."""
    service = slot.service
    current = service.current
    if current is None or not slot.health.alive:
        return reason
    if service.target is not None and current.key == assignment_key(service.target):
        return reason
    return f"{reason}; version {current.version} ({current.runtime}) keeps serving"


# --- operation results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """An operation ended: ``result`` is the installed module of a fetch, the instance a start
    or replace started; ``restart``: it started again the version that ran."""

    kind: Op
    key: str | None
    assignment: ModuleAssignment | None
    restart: bool = False
    error: BaseException | None = None
    result: object = None


def on_op_done(
    slot: Slot,
    done: Finished,
    *,
    restart: RestartSettings,
    now: float,
    wall: datetime,
    rand: float,
) -> Outcome:
    """An operation of the service ended (it no longer holds the service)."""
    name = slot.service.name
    slot = replace(slot, service=slot.service.model_copy(update={"progress": None}), busy=False)
    dirty = Dirty(save=True, report=True, plan=True)
    error = done.error
    if done.kind is Op.STOP:
        said = (Say(logging.ERROR, f"{name}: stop failed: {error}"),) if error is not None else ()
        return Outcome(slot, (dirty, *said, Forget(name)))
    if error is None:
        if done.kind is Op.FETCH:
            assert isinstance(done.result, InstalledModule)
            return Outcome(replace(slot, retry_attempts=0), (dirty, Installed(done.result)))
        assert isinstance(done.result, InstanceRecord)
        out = started(
            slot, done.result, restarted=done.restart, settle_s=restart.settle_s, now=now, wall=wall
        )
        return Outcome(out.slot, (dirty, *out.effects))
    if isinstance(error, Cancelled):
        return Outcome(slot, (dirty, Say(logging.INFO, f"{name}: {done.kind} cancelled")))
    out = failed(slot, done, error, restart=restart, now=now, wall=wall, rand=rand)
    return Outcome(out.slot, (dirty, *out.effects))


def started(
    slot: Slot, instance: InstanceRecord, *, restarted: bool, settle_s: float, now: float, wall: datetime
) -> Outcome:
    """An instance started and answered: it serves. The one it replaces stands by until the
    new version settles, drains and stops, or (when it stopped answering) is killed."""
    service = slot.service
    name = service.name
    old = service.current
    old_health = slot.health if old is not None else Health()
    update: dict[str, object] = {
        "current": instance,
        "last_good": instance.assignment,
        "healthy_since": wall,
    }
    if old is None or old.key != instance.key:
        update["failures"] = 0  # the restart backoff counts this version's failures only
    if old is not None and old.key != instance.key:
        update["previous"] = old.assignment
    if restarted:
        update["restarts"] = service.restarts + 1
    effects: list[Effect] = []
    standby = service.standby
    if standby is not None and standby.key == instance.key:
        standby = None  # the same version started anew: it takes over
        effects.append(Retire(name, service.standby, STOP_GRACE_S + DRAIN_S))  # type: ignore[arg-type]
    killing = slot.killing
    if old is not None and old.id != instance.id:
        answering = old_health.alive and old_health.misses == 0
        if (
            answering
            and old.key != instance.key
            and standby is None
            and old.runtime is instance.runtime  # else the start stopped it already
            and settle_s > 0
        ):
            # The last good instance keeps serving beside the new version until that one has
            # been healthy for the settle time (see the settle timer).
            standby = old
        elif old_health.misses == 0:
            effects.append(Retire(name, old, STOP_GRACE_S + DRAIN_S))
        else:
            # An instance that stopped answering gets no time to drain (its queue is not
            # moving): it is killed, and its successor is Healthy once it is gone.
            effects.append(Retire(name, old, 0.0, kill=True))
            killing = True
    update["standby"] = standby
    slot = replace(
        slot,
        service=service.model_copy(update=update),
        health=Health(alive=True),
        retry_attempts=0,
        unschedulable=None,
        killing=killing,
        settle_at=now + settle_s if standby is not None else slot.settle_at,
    )
    state, reason = steady(slot)
    if state is ServiceState.HEALTHY and slot.killing:
        state, reason = ServiceState.TRANSITIONING, "stopping the instance that stopped answering"
    new_service, said = _status(slot.service, state, reason, wall)
    return Outcome(replace(slot, service=new_service), (*effects, *said, Watch(), Collect()))


def failed(
    slot: Slot,
    done: Finished,
    error: BaseException,
    *,
    restart: RestartSettings,
    now: float,
    wall: datetime,
    rand: float,
) -> Outcome:
    """An operation failed: Unschedulable for a while, retried after a backoff, counted as a
    crash of a version that ran here before, or failed here for good."""
    if done.restart:
        # A restart counts when it is made, as Docker's RestartCount and Kubernetes'
        # restartCount do, not only once the instance answered: a module that died 0.3 s after
        # init() counted 1 or 2 restarts for the same three crashes, by how fast it answered.
        restarts = slot.service.restarts + 1
        slot = replace(slot, service=slot.service.model_copy(update={"restarts": restarts}))
    service = slot.service
    name = service.name
    key = done.key
    version = done.assignment.version if done.assignment else "?"
    good = service.last_good
    judged = judge_failure(
        error,
        starting=done.kind in (Op.START, Op.REPLACE),
        ran_here_before=good is not None and key == assignment_key(good),
    )
    effects: list[Effect] = []
    if not isinstance(error, EdgepackError):
        effects.append(
            Say(logging.ERROR, f"{name}: {done.kind} of version {version} failed unexpectedly", error)
        )
    match judged.verdict:
        case FailureKind.UNSCHEDULABLE:
            if key is not None:
                slot = replace(slot, unschedulable=(key, judged.reason, now + UNSCHEDULABLE_RECHECK_S))
            state, why = ServiceState.UNSCHEDULABLE, serving_note(slot, judged.reason)
        case FailureKind.RETRY:
            attempt = slot.retry_attempts
            delay = judged.retry_after_s or full_jitter(attempt, rand, cap_s=60.0)
            slot = replace(slot, retry_attempts=attempt + 1, retry_at=now + delay)
            text = f"{done.kind} of version {version}: {judged.reason}; retrying in {delay:.0f}s"
            state, why = ServiceState.TRANSITIONING, serving_note(slot, text)
        case FailureKind.CRASH:
            # A version that ran here before: a crash to retry with backoff, not a verdict.
            out = count_failure(
                slot, Trouble.EXITED, None, judged.reason, restart=restart, now=now, wall=wall, rand=rand,
                failure=judged.failure,
            )  # fmt: skip
            return Outcome(out.slot, (*effects, *out.effects))
        case FailureKind.FINAL:
            if key is not None:
                failed_keys = {**service.failed, key: judged.reason}
                slot = replace(slot, service=service.model_copy(update={"failed": failed_keys}))
            effects.append(Say(logging.WARNING, f"{name}: version {version} failed: {judged.reason}"))
            state, why = steady(slot)
            new_service, said = _status(slot.service, state, why, wall, judged.failure)
            return Outcome(replace(slot, service=new_service), (*effects, *said))
    new_service, said = _status(slot.service, state, why, wall)
    return Outcome(replace(slot, service=new_service), (*effects, *said))


# --- desired states ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """What the agent applied of its desired states: its record (the applied generation, each
    service's target), the last verified state and its bytes, and the retry timers a new
    target resets."""

    record: AgentRecord
    desired: DesiredState | None = None
    payload: bytes | None = None
    retry_at: Mapping[str, float] = field(default_factory=dict)
    retry_attempts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Acceptance:
    applied: Applied
    effects: tuple[Effect, ...] = ()


def same_generation(payload: bytes, applied_generation: int) -> bool:
    try:
        generation = json.loads(payload)["signed"]["generation"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(generation == applied_generation)


def on_desired(
    applied: Applied,
    payload: bytes,
    source: str,
    *,
    hub_trust: TrustStore,
    device_id: str,
    wall: datetime,
    hub_now: datetime | None = None,
) -> Acceptance:
    """A desired state arrived from ``source`` (``mqtt`` or ``http``): refused (and said so,
    unless it is a redelivery or a stale poll), or accepted as each service's new target.
    ``hub_now``: the hub's clock when it sent the state over HTTP (a refusal of a state expired
    only by the device's clock then names the skew)."""
    if payload == applied.payload:
        return Acceptance(applied)
    record = applied.record
    try:
        state = verify_desired(
            payload,
            hub_trust=hub_trust,
            device_id=device_id,
            applied_generation=record.applied_generation,
            now=wall,
            hub_now=hub_now,
        )
    except DesiredStateRefused as exc:
        if exc.reason is DesiredRefusal.NOT_NEWER and same_generation(payload, record.applied_generation):
            return Acceptance(applied)  # the same generation again (a retained message redelivered)
        if exc.reason is DesiredRefusal.NOT_NEWER and source == "http":
            # A poll sent before the newest state came over MQTT answers the hub's older one:
            # stale, not hostile. Nothing is applied; reporting it would hide a real refusal
            # behind a false one.
            stale = Say(logging.DEBUG, f"desired state over HTTP older than the applied one: {exc}")
            return Acceptance(applied, (stale,))
        error = f"desired state from {source} refused ({exc.reason}): {exc}"[:2000]
        return Acceptance(
            replace(applied, record=record.model_copy(update={"last_error": error})),
            (
                Say(logging.WARNING, f"desired state from {source} refused: {exc}"),
                Dirty(save=True, report=True),
            ),
        )
    services = dict(record.services)
    retry_at, retry_attempts = dict(applied.retry_at), dict(applied.retry_attempts)
    modules = ", ".join(f"{m.service}={m.module}:{m.version}" for m in state.modules) or "no services"
    effects: list[Effect] = [
        SaveDesired(payload),
        Say(logging.INFO, f"desired state generation {state.generation} accepted from {source}: {modules}"),
    ]
    for assignment in state.modules:
        name = assignment.service
        service = services.get(name) or ServiceRecord(name=name, since=wall)
        if service.target != assignment:
            previous = service.target
            service = service.model_copy(update={"target": assignment})
            if previous is None or assignment_key(previous) != assignment_key(assignment):
                # The retry timer was the replaced target's: the new one starts at once.
                retry_at.pop(name, None)
                retry_attempts.pop(name, None)
            service, said = back_to_serving(service, previous, wall)
            effects += said
        service, rotated = rotate_keys(service, assignment)
        effects += rotated
        services[name] = service
    effects.append(Dirty(save=True, report=True, plan=True))
    record = record.model_copy(
        update={
            "services": services,
            "applied_generation": state.generation,
            "applied_at": wall,
            "last_error": None,
        }
    )
    return Acceptance(Applied(record, state, payload, retry_at, retry_attempts), tuple(effects))


def back_to_serving(
    service: ServiceRecord, previous: ModuleAssignment | None, wall: datetime
) -> tuple[ServiceRecord, list[Effect]]:
    """A release reverted to the version that kept serving after the new one failed: the
    failure was the abandoned version's, and nothing needs doing (the plan keeps what runs),
    so the service is Healthy again instead of Failed for ever."""
    current = service.current
    if previous is None or current is None or service.state is not ServiceState.FAILED:
        return service, []
    if assignment_key(previous) == current.key or service.target is None:
        return service, []  # the serving version itself failed (a crash loop): that stays Failed
    if assignment_key(service.target) == current.key:
        return _status(service, ServiceState.HEALTHY, None, wall)
    return service, []


def rotate_keys(service: ServiceRecord, assignment: ModuleAssignment) -> tuple[ServiceRecord, list[Effect]]:
    """New endpoint keys for what runs already: its keys file is rewritten, no restart."""
    current = service.current
    if current is None or current.key != assignment_key(assignment):
        return service, []
    if current.assignment.settings.auth == assignment.settings.auth:
        return service, []
    rotated = current.model_copy(update={"assignment": assignment})
    return service.model_copy(update={"current": rotated}), [
        RotateKeys(service.name, current, assignment.settings.auth),
        Say(logging.INFO, f"{service.name}: endpoint keys rotated"),
    ]


# --- one step over all the records ---------------------------------------------------------------


@dataclass(frozen=True)
class OpView:
    """An operation under way, as the decisions see it (its thread and controls are the loop's)."""

    id: int
    kind: Op
    key: str | None
    assignment: ModuleAssignment | None
    restart: bool = False


@dataclass(frozen=True)
class Records:
    """Everything the agent's decisions read and change, frozen: its persisted record, the
    applied desired state, the health of serving instances, the operations under way, the
    instances being retired (and which of them are killed), the per-service timers and the
    poll's."""

    agent: AgentRecord
    desired: DesiredState | None = None
    payload: bytes | None = None
    health: Mapping[str, Health] = field(default_factory=dict)
    ops: Mapping[str, OpView] = field(default_factory=dict)
    retiring: Mapping[str, tuple[str, InstanceRecord]] = field(default_factory=dict)
    killing: frozenset[str] = frozenset()
    restart_at: Mapping[str, float] = field(default_factory=dict)
    retry_at: Mapping[str, float] = field(default_factory=dict)
    retry_attempts: Mapping[str, int] = field(default_factory=dict)
    unschedulable: Mapping[str, tuple[str, str, float]] = field(default_factory=dict)
    settle_at: Mapping[str, float] = field(default_factory=dict)
    next_poll: float = 0.0
    poll_attempts: int = 0
    poll_in_flight: bool = False
    etag: str | None = None
    progress_reported: Mapping[str, float] = field(default_factory=dict)
    next_op_id: int = 0

    @property
    def hub_reads_newer(self) -> bool:
        """The hub that issued the applied desired state reads this agent's newer fields
        (``manifests.compat.encode_for_hub``)."""
        return self.desired is not None and self.desired.hub_reads_newer


@dataclass(frozen=True)
class Context:
    """What the decisions need of the agent's settings and credentials."""

    device_id: str
    hub_trust: TrustStore
    restart: RestartSettings = field(default_factory=RestartSettings)
    poll_interval_s: float = 60.0


@dataclass(frozen=True)
class Looked:
    """What the loop looked up for an event before the step (the step reads no runtime):
    the exited instance's last log lines, and whether the standby still runs."""

    log_lines: tuple[str, ...] = ()
    standby_alive: bool = False


@dataclass(frozen=True)
class SettleDue:
    """The settle timer of a service ran out: its standby may stop."""

    service: str


@dataclass(frozen=True)
class AnswerLogs:
    """A log request arrived: it is answered from the runtimes (the loop's side)."""

    payload: bytes


@dataclass(frozen=True)
class Halt:
    """Stop the loop."""


#: a download's progress is reported at most this often
PROGRESS_REPORT_EVERY_S = 2.0


def slot_of(records: Records, name: str, *, looked: Looked = Looked(), wall: datetime) -> Slot:
    """What the per-service decisions see of service ``name`` (a new record if it has none)."""
    service = records.agent.services.get(name) or ServiceRecord(name=name, since=wall)
    current = service.current
    return Slot(
        service=service,
        health=records.health.get(current.id, Health()) if current is not None else Health(),
        standby_alive=looked.standby_alive,
        restart_at=records.restart_at.get(name),
        settle_at=records.settle_at.get(name),
        busy=name in records.ops,
        killing=any(records.retiring[iid][0] == name for iid in records.killing if iid in records.retiring),
        retry_at=records.retry_at.get(name),
        retry_attempts=records.retry_attempts.get(name, 0),
        unschedulable=records.unschedulable.get(name),
    )


def _put(mapping: Mapping[str, Any], name: str, value: Any) -> dict[str, Any]:
    out = dict(mapping)
    if value is None:
        out.pop(name, None)
    else:
        out[name] = value
    return out


def merge(records: Records, name: str, before: Slot, outcome: Outcome, *, keep_health: bool = False) -> Step:
    """The records with a per-service decision's slot in them, and the retirements and
    removals it asked for applied (the effects still go out: the executor stops the instance)."""
    slot = outcome.slot
    services = {**records.agent.services, name: slot.service}
    health = dict(records.health)
    current = slot.service.current
    if current is not None and (
        keep_health
        or current.id in health
        or slot.health != before.health
        or before.service.current is None
        or before.service.current.id != current.id
    ):
        health[current.id] = slot.health
    retiring, killing = dict(records.retiring), set(records.killing)
    records = replace(
        records,
        restart_at=_put(records.restart_at, name, slot.restart_at),
        settle_at=_put(records.settle_at, name, slot.settle_at),
        retry_at=_put(records.retry_at, name, slot.retry_at),
        retry_attempts=_put(records.retry_attempts, name, slot.retry_attempts or None),
        unschedulable=_put(records.unschedulable, name, slot.unschedulable),
    )
    for effect in outcome.effects:
        match effect:
            case Retire(service=service_name, instance=instance, kill=kill):
                retiring[instance.id] = (service_name, instance)
                health.pop(instance.id, None)
                if kill:
                    killing.add(instance.id)
            case Forget(service=gone):
                dropped = services.pop(gone, None)
                records = replace(
                    records,
                    restart_at=_put(records.restart_at, gone, None),
                    retry_at=_put(records.retry_at, gone, None),
                    unschedulable=_put(records.unschedulable, gone, None),
                    settle_at=_put(records.settle_at, gone, None),
                )
                if dropped is not None and dropped.current is not None:
                    health.pop(dropped.current.id, None)
    agent = records.agent.model_copy(update={"services": services})
    records = replace(records, agent=agent, health=health, retiring=retiring, killing=frozenset(killing))
    return records, outcome.effects


def end_settle(slot: Slot, *, settle_s: float, now: float, wall: datetime) -> Outcome:
    """The settle timer ran out: the new version has been healthy for the settle time, and the
    standby drains and stops; or not yet (a probe missed since), and the timer is set again."""
    service = slot.service
    current, standby = service.current, service.standby
    if standby is None or current is None:
        return Outcome(slot)
    healthy_for = _healthy_for(service, wall)
    if not slot.health.alive or slot.health.misses or healthy_for < settle_s:
        # Not settled yet: look again once it may have. A crash restarts it, and the start
        # arms the timer anew.
        if slot.health.alive:
            return Outcome(replace(slot, settle_at=now + max(settle_s - healthy_for, 1.0)))
        return Outcome(slot)
    text = f"{service.name}: version {current.version} settled; stopping version {standby.version}"
    return Outcome(
        replace(slot, service=service.model_copy(update={"standby": None})),
        (Say(logging.INFO, text), Retire(service.name, standby, STOP_GRACE_S + DRAIN_S), Dirty(save=True)),
    )


def step(
    records: Records,
    event: Event | SettleDue,
    *,
    ctx: Context,
    now: float,
    wall: datetime,
    rand: float,
    looked: Looked = Looked(),
) -> Step:
    """What one event does to the records, and what it asks of the world (pure).

    ``now`` is the monotonic clock (timers), ``wall`` the UTC time (records), ``rand`` a
    uniform draw for backoff jitter, ``looked`` what the loop looked up for this event.
    """
    match event:
        case DesiredMessage(payload=payload, source=source):
            return _desired(records, payload, source, ctx=ctx, wall=wall)
        case Connected():
            # A missed retained message must not matter: poll at once.
            return replace(records, next_poll=now), (Dirty(report=True),)
        case Disconnected():
            return records, ()
        case HttpDesired(fetch=fetch, error=error):
            records = replace(records, poll_in_flight=False)
            if error is not None:
                return _poll_failed(records, error, ctx=ctx, now=now, rand=rand)
            records = replace(records, poll_attempts=0, next_poll=now + ctx.poll_interval_s)
            cleared: tuple[Action, ...] = ()
            if records.agent.last_error == TOKEN_REFUSED_ERROR:  # the hub takes the token again
                records = replace(records, agent=records.agent.model_copy(update={"last_error": None}))
                cleared = (Dirty(save=True, report=True),)
            if fetch is None:
                return records, cleared
            records = replace(records, etag=fetch.etag)
            if fetch.data is None:
                return records, cleared
            hub_now = fetch.hub_time
            records, accepted = _desired(records, fetch.data, "http", ctx=ctx, wall=wall, hub_now=hub_now)
            return records, cleared + accepted
        case OpDone(service=name, op_id=op_id, result=result, error=error):
            running = records.ops.get(name)
            if running is None or running.id != op_id:
                return records, ()
            records = replace(records, ops={n: o for n, o in records.ops.items() if n != name})
            done = Finished(running.kind, running.key, running.assignment, running.restart, error, result)
            slot = slot_of(records, name, looked=looked, wall=wall)
            out = on_op_done(slot, done, restart=ctx.restart, now=now, wall=wall, rand=rand)
            return merge(records, name, slot, out)
        case OpProgress(service=name, op_id=op_id, progress=progress):
            running = records.ops.get(name)
            if running is None or running.id != op_id:
                return records, ()
            service = records.agent.services.get(name) or ServiceRecord(name=name, since=wall)
            services = {**records.agent.services, name: service.model_copy(update={"progress": progress})}
            records = replace(records, agent=records.agent.model_copy(update={"services": services}))
            if now - records.progress_reported.get(name, 0.0) < PROGRESS_REPORT_EVERY_S:
                return records, ()
            return replace(records, progress_reported={**records.progress_reported, name: now}), (
                Dirty(report=True),
            )
        case ProbeResult(service=name, instance_id=instance_id, alive=alive):
            probed = records.agent.services.get(name)
            if probed is None or probed.current is None or probed.current.id != instance_id:
                return records, ()  # an instance that no longer serves
            running = records.ops.get(name)
            if not alive and running is not None and running.kind in (Op.START, Op.REPLACE):
                # The start under way ends with another instance serving, or fails and hands
                # the service back, and a later probe judges this one then. A move to another
                # runtime stops the serving instance itself first: counted as a crash, that
                # stop scheduled a restart beside the new instance (two containers).
                return records, ()
            slot = slot_of(records, name, looked=looked, wall=wall)
            out = on_probe(
                slot,
                event,
                log_lines=list(looked.log_lines),
                restart=ctx.restart,
                now=now,
                wall=wall,
                rand=rand,
            )
            return merge(records, name, slot, out, keep_health=True)
        case LogRequestMessage(payload=payload):
            return records, (AnswerLogs(payload),)
        case Retired(instance_id=instance_id):
            retired = records.retiring.get(instance_id)
            health = {i: h for i, h in records.health.items() if i != instance_id}
            killed = instance_id in records.killing
            records = replace(
                records,
                retiring={i: r for i, r in records.retiring.items() if i != instance_id},
                health=health,
                killing=records.killing - {instance_id},
            )
            effects: tuple[Action, ...] = (Collect(),)
            if not killed or retired is None or retired[0] not in records.agent.services:
                return records, effects
            # Its successor is Healthy once the instance that stopped answering is gone.
            slot = slot_of(records, retired[0], wall=wall)
            records, settled = merge(records, retired[0], slot, settle(slot, wall))
            return records, (*effects, *settled)
        case SettleDue(service=name):
            if name not in records.agent.services:
                return records, ()
            slot = slot_of(records, name, wall=wall)
            return merge(
                records, name, slot, end_settle(slot, settle_s=ctx.restart.settle_s, now=now, wall=wall)
            )
        case Stop():
            return records, (Halt(),)
    raise TypeError(f"no step for {type(event).__name__}")  # pragma: no cover


def _desired(
    records: Records,
    payload: bytes,
    source: str,
    *,
    ctx: Context,
    wall: datetime,
    hub_now: datetime | None = None,
) -> Step:
    before = Applied(
        records.agent, records.desired, records.payload, records.retry_at, records.retry_attempts
    )
    out = on_desired(
        before, payload, source, hub_trust=ctx.hub_trust, device_id=ctx.device_id, wall=wall, hub_now=hub_now
    )
    applied = out.applied
    records = replace(
        records,
        agent=applied.record,
        desired=applied.desired,
        payload=applied.payload,
        retry_at=applied.retry_at,
        retry_attempts=applied.retry_attempts,
    )
    return records, out.effects


#: what the reported state says while the hub refuses the device token (the log says how to
#: enroll again); set once, not per poll, and cleared when the hub takes the token again
TOKEN_REFUSED_ERROR = "the hub refuses the device token: enroll the device again (see the agent's log)"


def _poll_failed(records: Records, error: EdgepackError, *, ctx: Context, now: float, rand: float) -> Step:
    delay = full_jitter(records.poll_attempts, rand, cap_s=60.0)
    records = replace(
        records, poll_attempts=records.poll_attempts + 1, next_poll=now + min(delay, ctx.poll_interval_s)
    )
    text = f"desired state over HTTP: {error}; retrying in {delay:.1f}s"
    if not isinstance(error, TokenRefused):
        return records, (Say(logging.INFO, text),)
    # The refusal was logged as an error by the uplink, with what to do; each poll inside its
    # backoff is only a debug line, and the reported state says it once.
    effects: tuple[Effect, ...] = (Say(logging.DEBUG, text),)
    if records.agent.last_error != TOKEN_REFUSED_ERROR:
        records = replace(records, agent=records.agent.model_copy(update={"last_error": TOKEN_REFUSED_ERROR}))
        effects += (Dirty(save=True, report=True),)
    return records, effects


# --- planning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    """Run operation ``op`` for a service (``replaces``: the instance a Replace takes over
    from; ``stops``: what a Stop stops)."""

    service: str
    op: OpView
    replaces: InstanceRecord | None = None
    stops: tuple[InstanceRecord, ...] = ()


@dataclass(frozen=True)
class Cancel:
    """The desired state moved on: the service's operation stops at its next safe point."""

    service: str


def wanted_of(
    records: Records, *, cached: Mapping[str, bool], runtimes: frozenset[str], now: float
) -> dict[str, Wanted]:
    """The services the desired state asks for, with what the device knows of them (``cached``:
    manifest digest -> whether its verified module is complete in the cache)."""
    out: dict[str, Wanted] = {}
    if records.desired is None:
        return out
    for a in records.desired.modules:
        key = assignment_key(a)
        why: str | None = None
        if a.settings.runtime is not None and a.settings.runtime not in runtimes:
            enabled = ", ".join(sorted(runtimes)) or "none"
            why = (
                f"runtime {a.settings.runtime} is not enabled on this device (enabled: {enabled}); "
                "enable it in agent.toml or deploy the service with another runtime"
            )
        else:
            memo = records.unschedulable.get(a.service)
            if memo is not None and memo[0] == key and now < memo[2]:
                why = memo[1]
        out[a.service] = Wanted(a, key, cached.get(a.manifest_digest, False), why)
    return out


def observed_of(records: Records, *, now: float) -> dict[str, Observed]:
    """The services as they are on the device."""
    out: dict[str, Observed] = {}
    for name, service in records.agent.services.items():
        current = service.current
        op = records.ops.get(name)
        restart_at = records.restart_at.get(name)
        fallback = next(
            (a for a in (service.last_good, service.previous)
             if a is not None and assignment_key(a) not in service.failed),
            None,
        )  # fmt: skip
        out[name] = Observed(
            running_key=current.key if current else None,
            running_alive=current is not None and records.health.get(current.id, Health()).alive,
            fallback=fallback,
            op=op.kind if op else None,
            op_key=op.key if op else None,
            failed_keys=frozenset(service.failed),
            restart_due=restart_at is not None and now >= restart_at,
        )
    return out


def replan(
    records: Records, *, cached: Mapping[str, bool], runtimes: frozenset[str], now: float, wall: datetime
) -> Step:
    """The planner's verdicts for every service, as records and effects: operations to run
    (unless a retry timer holds them back), to cancel, services to refuse, and services that
    nothing runs and nothing wants, forgotten."""
    effects: list[Action] = []
    wanted = wanted_of(records, cached=cached, runtimes=runtimes, now=now)
    for action in plan(wanted, observed_of(records, now=now)):
        name = action.service
        match action.verdict:
            case Verdict.RUN:
                if now < records.retry_at.get(name, 0.0):
                    continue  # backing off after a temporary failure
                assert action.op is not None
                records, dispatched = _dispatch(records, name, action.op, action.assignment, wall=wall)
                effects += dispatched
            case Verdict.CANCEL:
                effects.append(Cancel(name))
            case Verdict.REFUSE:
                slot = slot_of(records, name, wall=wall)
                note = serving_note(slot, action.reason) if name in records.agent.services else action.reason
                service, said = _status(slot.service, ServiceState.UNSCHEDULABLE, note, wall)
                records = _with_service(records, service)
                effects += said
            case Verdict.KEEP | Verdict.WAIT:
                existing = records.agent.services.get(name)
                idle = existing is not None and existing.current is None and name not in records.ops
                if idle and name not in wanted:
                    slot = slot_of(records, name, wall=wall)
                    records, forgotten = merge(records, name, slot, Outcome(slot, (Forget(name),)))
                    effects += forgotten
    return records, tuple(effects)


def _with_service(records: Records, service: ServiceRecord) -> Records:
    services = {**records.agent.services, service.name: service}
    return replace(records, agent=records.agent.model_copy(update={"services": services}))


def _dispatch(
    records: Records, name: str, op: Op, assignment: ModuleAssignment | None, *, wall: datetime
) -> Step:
    """An operation starts for service ``name``: it holds the service, which says what it does."""
    service = records.agent.services.get(name) or ServiceRecord(name=name, since=wall)
    restart = False
    restart_at = records.restart_at
    if op in (Op.START, Op.REPLACE) and assignment is not None:
        restart = service.current is not None and service.current.key == assignment_key(assignment)
        restart_at = _put(restart_at, name, None)
    view = OpView(
        records.next_op_id + 1, op, assignment_key(assignment) if assignment else None, assignment, restart
    )
    target = f"version {assignment.version}" if assignment else ""
    said: list[Effect] = []
    stops: tuple[InstanceRecord, ...] = ()
    text: str | None = None
    match op:
        case Op.FETCH:
            service, said = _status(service, ServiceState.TRANSITIONING, f"downloading {target}", wall)
        case Op.START:
            text = f"{'restarting' if restart else 'starting'} {target}"
        case Op.REPLACE:
            if restart:
                text = f"restarting {target} beside the running instance"
            else:
                serving = service.current.version if service.current else "?"
                text = f"starting {target} beside version {serving}, which keeps serving"
        case Op.STOP:
            stops = tuple(i for i in (service.current, service.standby) if i is not None)
    if text is not None and not _hides_failure(service):
        service, said = _status(service, ServiceState.TRANSITIONING, text, wall)
    records = replace(
        _with_service(records, service),
        restart_at=restart_at,
        ops={**records.ops, name: view},
        next_op_id=view.id,
    )
    replaces = service.current if op is Op.REPLACE else None
    return records, (*said, Dispatch(name, view, replaces, stops))


def _hides_failure(service: ServiceRecord) -> bool:
    """A rollback restart must not hide why the wanted version failed."""
    target = service.target
    return (
        service.state is ServiceState.FAILED
        and target is not None
        and assignment_key(target) in service.failed
    )


#: everything a step may ask of the world
Action = Effect | AnswerLogs | Halt | Dispatch | Cancel
Step = tuple[Records, tuple[Action, ...]]


# --- boot ----------------------------------------------------------------------------------------


def restore(records: Records, data: bytes, *, ctx: Context, wall: datetime) -> Step:
    """The last verified desired state, read back at boot, checked again (signature, device) as
    of when it was applied: after a reboot an expired state still says what to run until the
    hub speaks. A damaged, foreign or older one is left aside (the hub sends the state again)."""
    agent = records.agent
    try:
        signed = json.loads(data)["signed"]
        generation = int(signed["generation"])
        applied_at = agent.applied_at or datetime.fromisoformat(signed["issued"])
    except (ValueError, KeyError, TypeError):
        return records, (Say(logging.ERROR, "the saved desired state is damaged; waiting for the hub"),)
    try:
        # The desired file is written before the state file: a crash in between leaves a newer
        # desired state, which was verified before it was written.
        state = verify_desired(
            data,
            hub_trust=ctx.hub_trust,
            device_id=ctx.device_id,
            applied_generation=min(generation, max(agent.applied_generation, 1)) - 1,
            now=applied_at,
        )
    except DesiredStateRefused as exc:
        text = f"the saved desired state no longer verifies ({exc}); waiting for the hub"
        return records, (Say(logging.ERROR, text),)
    if state.generation < agent.applied_generation:
        text = (
            f"the saved desired state is generation {state.generation}, older than the applied "
            f"{agent.applied_generation}; waiting for the hub"
        )
        return records, (Say(logging.ERROR, text),)
    services = dict(agent.services)
    for assignment in state.modules:
        service = services.get(assignment.service) or ServiceRecord(name=assignment.service, since=wall)
        services[assignment.service] = service.model_copy(update={"target": assignment})
    agent = agent.model_copy(
        update={"applied_generation": state.generation, "applied_at": applied_at, "services": services}
    )
    return replace(records, agent=agent, desired=state, payload=data), ()
