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

import logging
from dataclasses import dataclass, replace
from datetime import datetime

from edge_agent.backoff import RestartBackoff
from edge_agent.health import ProbeResult
from edge_agent.reconcile.plan import assignment_key
from edge_agent.reconcile.steady import steady_state
from edge_agent.reconcile.supervise import Trouble, after_failure, log_tail_reason
from edge_agent.state.records import InstanceRecord, ServiceRecord
from manifests.device import RestartSettings
from manifests.states import ServiceState


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
    hand it connections, so the service is not called Healthy).
    """

    service: ServiceRecord
    health: Health = Health()
    standby_alive: bool = False
    restart_at: float | None = None
    settle_at: float | None = None
    busy: bool = False
    killing: bool = False


# --- effects -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retire:
    """Stop ``instance`` (it no longer serves) after ``grace_s`` of draining."""

    service: str
    instance: InstanceRecord
    grace_s: float


@dataclass(frozen=True)
class Watch:
    """The serving instances changed: the prober follows."""


@dataclass(frozen=True)
class Say:
    """A line for the agent's log."""

    level: int
    text: str


@dataclass(frozen=True)
class Dirty:
    """What must happen after this batch of events: save, report, plan again."""

    save: bool = False
    report: bool = False
    plan: bool = False


Effect = Retire | Watch | Say | Dirty


@dataclass(frozen=True)
class Outcome:
    slot: Slot
    effects: tuple[Effect, ...] = ()


# --- helpers -------------------------------------------------------------------------------------


def _status(
    service: ServiceRecord, state: ServiceState, reason: str | None, wall: datetime
) -> tuple[ServiceRecord, list[Effect]]:
    """``service`` in ``state`` for ``reason`` (its ``since`` moves when the state changes)."""
    effects: list[Effect] = [Dirty(save=True, report=True)]
    update: dict[str, object] = {"state": state, "reason": reason}
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
        reason = log_tail_reason(f"version {current.version} exited (code {code})", log_lines)
        dead = replace(slot, health=replace(health, alive=False))
        out = count_failure(
            dead, Trouble.EXITED, result.exit_code, reason, restart=restart, now=now, wall=wall, rand=rand
        )
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
) -> Outcome:
    """One more failure of the current instance: the restart policy and its backoff, and a
    crash loop that ends in Failed or hands back to the standby that kept serving."""
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
    service, said = _status(slot.service, state, why, wall)
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
