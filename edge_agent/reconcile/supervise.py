"""Keeping a running module healthy: when to call it Unhealthy, whether to restart it, when a
crash loop ends in Failed, and whether to roll back (pure; the caller supplies time and
randomness).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from edge_agent.backoff import RestartBackoff
from manifests.desired import RestartPolicy
from manifests.errors import EdgepackError, ModuleStartFailure, Unschedulable
from manifests.reported import FailureDetail

#: consecutive failures after which a crash loop is reported as Failed
CRASH_LOOP_LIMIT = 5


class Trouble(StrEnum):
    EXITED = "exited"  # the process or container ended
    UNHEALTHY = "unhealthy"  # alive but missed failure_threshold probes in a row


def should_restart(policy: RestartPolicy, trouble: Trouble, exit_code: int | None) -> bool:
    """Whether the restart policy restarts a module that ran into ``trouble``.

    ``on-failure`` restarts an unhealthy module and one that exited with an error, not one
    that exited cleanly (code 0); ``never`` leaves it as it is; ``always`` always restarts.
    """
    match policy:
        case RestartPolicy.ALWAYS:
            return True
        case RestartPolicy.NEVER:
            return False
        case RestartPolicy.ON_FAILURE:
            return trouble is Trouble.UNHEALTHY or exit_code != 0
    raise ValueError(policy)


@dataclass(frozen=True)
class RestartPlan:
    """What to do after one more failure of a running module."""

    restart_in_s: float | None  # None: do not restart
    crash_loop: bool  # the failure count reached the limit: report Failed
    failures: int  # consecutive failures, this one included


def after_failure(
    *,
    policy: RestartPolicy,
    trouble: Trouble,
    exit_code: int | None,
    failures_before: int,
    healthy_for_s: float,
    rand: float,
    backoff: RestartBackoff = RestartBackoff(),
    limit: int = CRASH_LOOP_LIMIT,
) -> RestartPlan:
    """Count the failure (afresh when the module had been healthy for long) and pick the delay.

    A crash loop keeps being retried at the capped delay, so a module that only needed a
    dependency to come back recovers by itself; it is reported Failed meanwhile.
    """
    failures = 1 if backoff.forgiven(healthy_for_s) else failures_before + 1
    restart = should_restart(policy, trouble, exit_code)
    return RestartPlan(
        restart_in_s=backoff.delay(failures, rand) if restart else None,
        crash_loop=failures >= limit,
        failures=failures,
    )


class Verdict(StrEnum):
    """What an operation's failure means for the version it worked on."""

    UNSCHEDULABLE = "unschedulable"  # cannot run on this device as it is: report, look again later
    RETRY = "retry"  # temporary, or unexpected (never final): try again after a backoff
    CRASH = "crash"  # the version ran here before: a crash, counted by the restart policy
    FINAL = "final"  # the same bytes would fail the same way: failed here for good


@dataclass(frozen=True)
class FailureVerdict:
    verdict: Verdict
    reason: str
    retry_after_s: float | None = None  # what the hub asked for (Retry-After), if anything
    failure: FailureDetail | None = None  # the traceback and output of a module that failed


def judge_failure(error: BaseException, *, starting: bool, ran_here_before: bool) -> FailureVerdict:
    """What an operation's ``error`` means: ``starting`` for a start or replace, and
    ``ran_here_before`` when the version it started was healthy on this device before."""
    if isinstance(error, Unschedulable):
        return FailureVerdict(Verdict.UNSCHEDULABLE, str(error))
    if not isinstance(error, EdgepackError):
        # Not a verdict on the version (a bug, a race on the disk): never final.
        return FailureVerdict(Verdict.RETRY, f"{type(error).__name__}: {error}")
    if error.temporary:
        return FailureVerdict(Verdict.RETRY, str(error), error.retry_after_s)
    reason = str(error) or type(error).__name__
    failure = None
    if isinstance(error, ModuleStartFailure) and (error.traceback or error.log_lines):
        failure = FailureDetail.of(traceback=error.traceback, log_lines=error.log_lines)
    if isinstance(error, ModuleStartFailure) and starting and ran_here_before:
        return FailureVerdict(Verdict.CRASH, reason, failure=failure)
    return FailureVerdict(Verdict.FINAL, reason, failure=failure)
