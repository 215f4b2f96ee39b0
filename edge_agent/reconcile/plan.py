"""What to do for each service, decided from data alone (no clock, no I/O).

:func:`plan` compares what the verified desired state asks for with what the agent observes
(instances running, operations under way, versions that already failed, what the cache holds)
and returns one :class:`Action` per service. The executor applies them; after each operation
finishes the loop plans again, which is what makes an operation's end a *safe point*: a newer
desired state that arrived meanwhile decides the next step, and an operation working towards
something no longer wanted is cancelled.

Services are independent: a slow download of one never holds up another. Planning the same
inputs twice gives the same actions, and a device that already runs what is desired gets only
``Keep`` — applying a desired state twice does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from manifests.canonical import canonical_json
from manifests.desired import ModuleAssignment
from manifests.digests import sha256_digest


def assignment_key(assignment: ModuleAssignment) -> str:
    """Identifies what runs: module digest *and* settings (a new port or env is a new key).

    The endpoint's key hashes are left out (only whether it has keys counts): a rotation
    rewrites the running instance's keys file and must not restart it."""
    payload = assignment.model_dump(mode="json")
    payload["settings"]["auth"] = payload["settings"].get("auth") is not None
    return sha256_digest(canonical_json(payload))


class Op(StrEnum):
    """The operations the executor runs, one at a time per service."""

    FETCH = "fetch"  # download and verify the manifest and missing blobs, build the folder
    START = "start"  # start the module (nothing else serves the service)
    REPLACE = "replace"  # start beside the running instance, switch when ready, stop the old
    STOP = "stop"  # stop and forget the service


class Verdict(StrEnum):
    KEEP = "keep"  # nothing to do
    RUN = "run"  # start the operation :attr:`Action.op`
    CANCEL = "cancel"  # the operation under way works towards something no longer wanted
    WAIT = "wait"  # an operation is under way for what is wanted: let it finish
    REFUSE = "refuse"  # cannot run here (Unschedulable): report :attr:`Action.reason`


@dataclass(frozen=True)
class Wanted:
    """One service as the desired state asks for it, with what the device knows about it."""

    assignment: ModuleAssignment
    key: str
    cached: bool  # the verified module folder is complete in the cache
    unschedulable: str | None = None  # why it cannot run on this device, if it cannot


@dataclass(frozen=True)
class Observed:
    """One service as it is on the device."""

    running_key: str | None = None  # assignment key of the serving instance
    running_alive: bool = False
    # The last version that was Healthy here: what serves when the wanted one failed.
    fallback: ModuleAssignment | None = None
    op: Op | None = None  # operation under way
    op_key: str | None = None  # the assignment key it works towards
    failed_keys: frozenset[str] = frozenset()  # permanently failed here (until desired changes)
    restart_due: bool = False  # the running instance died or is unhealthy and may restart now


@dataclass(frozen=True)
class Action:
    service: str
    verdict: Verdict
    op: Op | None = None
    assignment: ModuleAssignment | None = None
    reason: str | None = None


def plan_service(name: str, want: Wanted | None, seen: Observed) -> Action:
    """The next step for one service."""
    if want is None:
        if seen.op is Op.STOP:
            return Action(name, Verdict.WAIT)
        if seen.op is not None:
            return Action(name, Verdict.CANCEL)
        if seen.running_key is not None:
            return Action(name, Verdict.RUN, Op.STOP)
        return Action(name, Verdict.KEEP)

    if seen.op is not None:
        # An operation for what is still wanted runs on; anything else gives way.
        return Action(name, Verdict.WAIT if seen.op_key == want.key else Verdict.CANCEL)

    running_wanted = seen.running_key == want.key
    if running_wanted and seen.running_alive and not seen.restart_due:
        return Action(name, Verdict.KEEP)
    if want.key in seen.failed_keys:
        # Failed for good on this device: retrying the same bytes fails the same way. The last
        # good version keeps serving, or goes back to serving when it is not alive.
        fallback = seen.fallback
        if fallback is None or assignment_key(fallback) == want.key:
            return Action(name, Verdict.KEEP)
        fallback_running = seen.running_key == assignment_key(fallback)
        if fallback_running and seen.running_alive and not seen.restart_due:
            return Action(name, Verdict.KEEP)
        if fallback_running and not seen.running_alive and not seen.restart_due:
            return Action(name, Verdict.KEEP)  # backing off before the restart
        op = Op.REPLACE if seen.running_alive else Op.START
        return Action(name, Verdict.RUN, op, fallback)
    if want.unschedulable is not None:
        return Action(name, Verdict.REFUSE, reason=want.unschedulable)
    if not want.cached:
        return Action(name, Verdict.RUN, Op.FETCH, want.assignment)
    if running_wanted and seen.restart_due:
        # A restart is a replacement by the same version: the old instance may still answer.
        op = Op.REPLACE if seen.running_alive else Op.START
        return Action(name, Verdict.RUN, op, want.assignment)
    if seen.running_key is not None and seen.running_alive:
        return Action(name, Verdict.RUN, Op.REPLACE, want.assignment)
    if running_wanted and not seen.restart_due:
        # Dead and not yet due for a restart (backing off): wait for the restart time.
        return Action(name, Verdict.KEEP)
    return Action(name, Verdict.RUN, Op.START, want.assignment)


def plan(wanted: Mapping[str, Wanted], observed: Mapping[str, Observed]) -> list[Action]:
    """One action per service that is wanted or present, sorted by service name."""
    names = sorted(set(wanted) | set(observed))
    return [plan_service(n, wanted.get(n), observed.get(n, Observed())) for n in names]
