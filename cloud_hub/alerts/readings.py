"""What each rule's subjects measure now, read from what the hub already stores.

Service metrics come from the telemetry samples received in the last ``window_s`` (summarised
by the charts' own rules, :func:`cloud_hub.ingest.series.service_summary`); ``device offline``
from each device's online flag and last-seen time; ``state`` from the service roll-up
(:mod:`cloud_hub.rollup`, through the dashboard's query). Every query is bounded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.alerts.evaluate import Reading, Rule
from cloud_hub.alerts.rules import Metric
from cloud_hub.fleet.tables import Deployment, Device
from cloud_hub.fleet.targeting import Target
from cloud_hub.ingest.series import Point, service_summary
from cloud_hub.ingest.tables import TelemetrySample
from cloud_hub.overview.queries import rollout, target_clause
from manifests.reported import Telemetry


class Readings:
    """Readings for one evaluation round; each source is read at most once per round."""

    def __init__(
        self, session: Session, now: datetime, *, window_s: float, max_samples: int, max_subjects: int
    ) -> None:
        self._session = session
        self._now = now
        self._window_s = window_s
        self._max_samples = max_samples
        self._max_subjects = max_subjects
        self._summary: dict[str, Point] | None = None
        self._deployments: dict[str, Deployment] | None = None

    def for_rule(self, rule: Rule) -> list[Reading]:
        metric = rule.condition.metric
        if metric is Metric.DEVICE_OFFLINE:
            return self._offline(rule)
        services = self._services(rule)
        if metric is Metric.STATE:
            return [
                Reading(f"service:{name}", rollout(self._session, d).state.value, service=name)
                for name, d in services.items()
            ]
        out = []
        for name in services:
            point = self.summary().get(name)
            value = None if point is None else _metric_of(point, metric)
            if value is not None:
                out.append(Reading(f"service:{name}", value, service=name))
        return out

    def _services(self, rule: Rule) -> dict[str, Deployment]:
        if self._deployments is None:
            rows = self._session.scalars(
                select(Deployment).order_by(Deployment.name).limit(self._max_subjects)
            )
            self._deployments = {d.name: d for d in rows}
        if rule.service is None:
            return self._deployments
        d = self._deployments.get(rule.service)
        return {} if d is None else {rule.service: d}

    def summary(self) -> dict[str, Point]:
        if self._summary is None:
            since = self._now - timedelta(seconds=self._window_s)
            payloads: Sequence[dict[str, Any]] = self._session.scalars(
                select(TelemetrySample.payload)
                .where(TelemetrySample.received_at >= since)
                .order_by(TelemetrySample.received_at.desc())
                .limit(self._max_samples)
            ).all()
            samples = []
            for payload in payloads:
                with contextlib.suppress(ValidationError):
                    samples.append(Telemetry.model_validate(payload))
            self._summary = service_summary(samples)
        return self._summary

    def _offline(self, rule: Rule) -> list[Reading]:
        # A device never heard of is not "offline": it may not be installed yet.
        query = select(Device.id, Device.online, Device.last_seen).where(
            Device.revoked.is_(False), Device.last_seen.is_not(None)
        )
        if rule.service is not None:
            d = self._services(rule).get(rule.service)
            if d is None:
                return []
            query = query.where(target_clause(Target.model_validate(d.target)))
        rows = self._session.execute(query.order_by(Device.id).limit(self._max_subjects))
        out = []
        for device_id, online, last_seen in rows:
            offline_s = (
                0.0 if online or last_seen is None else max(0.0, (self._now - last_seen).total_seconds())
            )
            out.append(Reading(f"device:{device_id}", offline_s, device_id=device_id))
        return out


def _metric_of(point: Point, metric: Metric) -> float | None:
    if metric is Metric.ERROR_RATE:
        return point.error_pct
    if metric is Metric.P95_MS:
        return point.p95_ms
    if metric is Metric.P50_MS:
        return point.p50_ms
    if metric is Metric.RUN_P95_MS:
        return point.run_p95_ms
    return point.requests_per_s
