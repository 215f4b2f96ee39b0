"""What a running rollout does next, decided from data alone (no database, no clock).

The hub's loop (``rollouts.loop``) reads the rollout row, the states its wave's devices report
and the telemetry of the bake, and asks :func:`decide`; it then applies the decision in one
fleet change that checks the row is still at the step it read (``rollouts.store``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from cloud_hub.rollouts.gates import Cohort, breach
from manifests.rollout import Gate


@dataclass(frozen=True)
class WaveHealth:
    """The devices of the waves released so far (``devices``), as they report the service."""

    devices: int
    healthy: int  # Healthy, serving the new version
    offline: int  # not online, so not waited for
    failed: list[tuple[str, str]] = field(default_factory=list)  # (device, reason) of Failed ones
    waiting: list[str] = field(default_factory=list)  # online, not Healthy on the new version yet


@dataclass(frozen=True)
class Progress:
    """The rollout row's part that a decision needs."""

    wave: int  # 0-based, released
    waves: int
    wave_started_at: datetime
    bake_started_at: datetime | None
    bake_s: float
    health_timeout_s: float
    gates: tuple[Gate, ...]
    previous: str  # the previous version, as the status line names it


@dataclass(frozen=True)
class Wait:
    pass


@dataclass(frozen=True)
class StartBake:
    at: datetime


@dataclass(frozen=True)
class Promote:
    """Release the next wave, or (``complete``) finish: every device runs the new version."""

    complete: bool = False


@dataclass(frozen=True)
class Halt:
    reason: str


Decision = Wait | StartBake | Promote | Halt
Cohorts = Callable[[datetime], tuple[Cohort, Cohort]]


def wave_name(p: Progress, devices: int) -> str:
    return f"wave {p.wave + 1} ({devices} device{'s' if devices != 1 else ''})"


def decide(p: Progress, health: WaveHealth, cohorts: Cohorts, now: datetime) -> Decision:
    """``cohorts(since)`` gives (new version's cohort, previous version's cohort) measured from
    ``since``; it is called only when a bake is over, as it reads telemetry."""
    if health.failed:
        device, reason = health.failed[0]
        more = f" (and {len(health.failed) - 1} more)" if len(health.failed) > 1 else ""
        return Halt(f"{wave_name(p, health.devices)}: device {device} Failed{more}: {reason}")
    if p.bake_started_at is None:
        if not health.waiting:
            return StartBake(now)
        if (now - p.wave_started_at).total_seconds() > p.health_timeout_s:
            return Halt(
                f"{wave_name(p, health.devices)}: {len(health.waiting)} device(s) not Healthy within "
                f"{p.health_timeout_s:g}s, e.g. {health.waiting[0]}"
            )
        return Wait()
    if (now - p.bake_started_at).total_seconds() < p.bake_s:
        return Wait()
    new, old = cohorts(p.bake_started_at)
    if p.gates and new.intervals == 0:
        # No device of the wave sent two samples since the bake began: nothing to judge yet.
        if (now - p.bake_started_at).total_seconds() < p.bake_s + p.health_timeout_s:
            return Wait()
        return Halt(
            f"{wave_name(p, health.devices)}: no telemetry from its devices within "
            f"{p.bake_s + p.health_timeout_s:g}s of the bake's start, so its gates cannot be judged"
        )
    broken = breach(p.gates, new, old, p.previous)
    if broken is not None:
        return Halt(f"{wave_name(p, health.devices)}: {broken}")
    return Promote(complete=p.wave + 1 >= p.waves)
