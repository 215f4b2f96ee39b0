"""Rules and alert states in the database: the API's reads and writes, and one evaluation round."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from cloud_hub.alerts.evaluate import Rule, Track, Transition, evaluate, resolved
from cloud_hub.alerts.readings import Readings
from cloud_hub.alerts.rules import Condition, Metric, check_rule_name, check_severity, parse_condition
from cloud_hub.alerts.tables import AlertRule, AlertState
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.events import record_event
from manifests.errors import ConfigError
from manifests.module import NAME_PATTERN

_SERVICE = re.compile(NAME_PATTERN)


def rule_of(row: AlertRule) -> Rule:
    condition = Condition(Metric(row.metric), row.operator, row.threshold, row.for_s, row.state)
    return Rule(row.name, condition, row.severity, row.service)


def add_rule(
    session: Session, *, name: str, condition: str, service: str | None, severity: str, max_rules: int
) -> AlertRule:
    check_rule_name(name)
    parsed = parse_condition(condition)
    level = check_severity(severity)
    if service is not None and not _SERVICE.fullmatch(service):
        raise ConfigError(f"alert rule {name}: service {service[:80]!r} is not a service name")
    if session.get(AlertRule, name) is not None:
        raise Conflict(f"alert rule {name} exists; remove it first to change it")
    count = session.scalar(select(func.count()).select_from(AlertRule)) or 0
    if count >= max_rules:
        raise Conflict(f"the hub holds {count} alert rules, its bound (alert_max_rules); remove one first")
    row = AlertRule(
        name=name,
        service=service,
        metric=parsed.metric.value,
        operator=parsed.operator,
        threshold=parsed.threshold,
        state=parsed.state,
        for_s=parsed.for_s,
        severity=level.value,
    )
    session.add(row)
    return row


def remove_rule(session: Session, name: str) -> list[Transition]:
    """Remove a rule; each of its firing alerts resolves (an event), so that whoever opened an
    incident from the fired event (a webhook subscriber) sees it closed."""
    row = session.get(AlertRule, name)
    if row is None:
        raise NotFound(f"no alert rule named {name[:80]}")
    firing = session.scalars(select(AlertState).where(AlertState.rule == name, AlertState.firing.is_(True)))
    rule = rule_of(row)
    moved = [resolved(rule, _track(s), "the rule was removed") for s in firing]
    for t in moved:
        record_event(session, t.kind, t.message, device_id=t.device_id, service=t.service)
    session.execute(delete(AlertState).where(AlertState.rule == name))
    session.delete(row)
    return moved


def list_rules(session: Session) -> list[AlertRule]:
    return list(session.scalars(select(AlertRule).order_by(AlertRule.name)))


def active_alerts(session: Session, *, limit: int) -> list[tuple[AlertState, AlertRule]]:
    rows = session.execute(
        select(AlertState, AlertRule)
        .join(AlertRule, AlertRule.name == AlertState.rule)
        .where(AlertState.firing.is_(True))
        .order_by(AlertState.fired_at.desc(), AlertState.rule, AlertState.subject)
        .limit(limit)
    )
    return [(state, rule) for state, rule in rows]


@dataclass(frozen=True)
class Window:
    """What one round reads: the telemetry window and the bounds of every query."""

    window_s: float
    max_samples: int
    max_subjects: int


def evaluate_all(session: Session, now: datetime, window: Window) -> list[Transition]:
    """Evaluate every rule, store the new states and record each transition as an event."""
    readings = Readings(
        session,
        now,
        window_s=window.window_s,
        max_samples=window.max_samples,
        max_subjects=window.max_subjects,
    )
    transitions: list[Transition] = []
    for row in list_rules(session):
        stored = {
            s.subject: s for s in session.scalars(select(AlertState).where(AlertState.rule == row.name))
        }
        tracks = {k: _track(s) for k, s in stored.items()}
        rule = rule_of(row)
        after, moved = evaluate(rule, readings.for_rule(rule), tracks, now)
        for subject, state in stored.items():
            if subject not in after:
                session.delete(state)
        for subject, track in after.items():
            state = stored.get(subject) or AlertState(rule=row.name, subject=subject)
            session.add(state)
            state.service, state.device_id = track.service, track.device_id
            state.pending_since, state.firing, state.fired_at = (
                track.pending_since,
                track.firing,
                track.fired_at,
            )
            state.value, state.message = track.value, track.message
        for t in moved:
            record_event(session, t.kind, t.message, device_id=t.device_id, service=t.service)
        transitions.extend(moved)
    return transitions


def _track(s: AlertState) -> Track:
    return Track(
        s.subject,
        s.pending_since,
        s.firing,
        s.fired_at,
        s.value,
        s.message,
        service=s.service,
        device_id=s.device_id,
    )
