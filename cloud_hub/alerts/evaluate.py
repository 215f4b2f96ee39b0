"""One evaluation of one rule (pure): readings and the stored tracks in, tracks and transitions out.

A subject (a service, or a device for ``device offline``) whose reading meets the condition is
*pending* from the first evaluation that saw it so; once it has been so for the rule's ``for``
duration the alert *fires*. A subject whose reading no longer meets it, or that has no reading
any more (no requests in the window, the service deleted), is dropped; if it was firing it
*resolves*. Only firing and resolving are transitions (events); pending is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from cloud_hub.alerts.rules import Condition, Metric

FIRED = "alert.fired"
RESOLVED = "alert.resolved"


@dataclass(frozen=True)
class Rule:
    name: str
    condition: Condition
    severity: str
    service: str | None = None  # None: fleet-wide


@dataclass(frozen=True)
class Reading:
    """What a subject measures now: a number, or a state word for ``state`` rules."""

    subject: str
    value: float | str
    service: str | None = None
    device_id: str | None = None


@dataclass(frozen=True)
class Track:
    """A subject's standing under a rule (stored as an ``AlertState`` row)."""

    subject: str
    pending_since: datetime
    firing: bool = False
    fired_at: datetime | None = None
    value: str | None = None
    message: str | None = None
    service: str | None = None
    device_id: str | None = None


@dataclass(frozen=True)
class Transition:
    kind: str  # FIRED or RESOLVED
    rule: str
    subject: str
    message: str
    service: str | None = None
    device_id: str | None = None


def show_value(metric: Metric, value: float | str) -> str:
    if isinstance(value, str):
        return value
    if metric is Metric.ERROR_RATE:
        return f"{value:.3g}%"
    if metric is Metric.DEVICE_OFFLINE:
        return f"offline {value:.0f}s"
    return f"{value:.4g}"


def _about(reading: Reading | Track) -> str:
    if reading.device_id is not None:
        return f"device {reading.device_id}"
    return f"service {reading.service}"


def evaluate(
    rule: Rule, readings: Iterable[Reading], tracks: Mapping[str, Track], now: datetime
) -> tuple[dict[str, Track], list[Transition]]:
    """The rule's tracks after this evaluation, and the alerts that fired or resolved."""
    condition = rule.condition
    out: dict[str, Track] = {}
    transitions: list[Transition] = []
    seen: set[str] = set()
    for reading in readings:
        seen.add(reading.subject)
        track = tracks.get(reading.subject)
        value = show_value(condition.metric, reading.value)
        if not condition.breached(reading.value):
            if track is not None and track.firing:
                transitions.append(resolved(rule, track, f"now {value}"))
            continue
        if track is None:
            track = Track(reading.subject, now, service=reading.service, device_id=reading.device_id)
        track = replace(track, value=value)
        held_s = (now - track.pending_since).total_seconds()
        if not track.firing and held_s >= condition.for_s:
            message = (
                f"alert {rule.name} ({rule.severity}) fired on {_about(reading)}: "
                f"{value}, condition {condition.text()}"
            )
            track = replace(track, firing=True, fired_at=now, message=message)
            transitions.append(
                Transition(FIRED, rule.name, reading.subject, message, reading.service, reading.device_id)
            )
        out[reading.subject] = track
    for subject, track in tracks.items():
        if subject not in seen and track.firing:
            transitions.append(resolved(rule, track, "no data any more"))
    return out, transitions


def resolved(rule: Rule, track: Track, why: str) -> Transition:
    since = f" (firing since {track.fired_at:%Y-%m-%d %H:%M:%S}Z)" if track.fired_at else ""
    message = f"alert {rule.name} resolved on {_about(track)}: {why}{since}"
    return Transition(RESOLVED, rule.name, track.subject, message, track.service, track.device_id)
