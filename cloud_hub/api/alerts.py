"""Routes: alert rules and the alerts firing now (admin), and Prometheus ``/metrics``.

``/metrics`` takes a bearer token: the admin's, or the read-only ``metrics_token`` setting
(what a Prometheus server should hold); ``metrics_public`` serves it to anyone.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.alerts.rules import MAX_CONDITION_CHARS
from cloud_hub.alerts.store import active_alerts, add_rule, list_rules, remove_rule, rule_of
from cloud_hub.alerts.tables import AlertRule, AlertState
from cloud_hub.api.deps import Admin, Core, Hub, bearer_token
from cloud_hub.errors import Unauthorized

router = APIRouter()
admin = APIRouter(prefix="/api/v1/alerts", dependencies=[Admin], tags=["alerts"])

#: Most firing alerts one answer lists (newest first).
MAX_ACTIVE_LISTED = 1000


class RuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    condition: str = Field(max_length=MAX_CONDITION_CHARS, description="e.g. 'error_rate > 1% for 5m'")
    service: str | None = Field(default=None, max_length=64, description="unset: every service (fleet-wide)")
    severity: str = Field(default="warning", max_length=16)


class RuleOut(BaseModel):
    name: str
    condition: str
    service: str | None
    metric: str
    severity: str
    for_s: int
    created_at: datetime

    @classmethod
    def of(cls, row: AlertRule) -> RuleOut:
        rule = rule_of(row)
        return cls(
            name=row.name, condition=rule.condition.text(), service=row.service, metric=row.metric,
            severity=row.severity, for_s=row.for_s, created_at=row.created_at,
        )  # fmt: skip


class AlertOut(BaseModel):
    rule: str
    severity: str
    condition: str
    service: str | None
    device_id: str | None
    value: str | None
    fired_at: datetime | None
    message: str | None

    @classmethod
    def of(cls, state: AlertState, row: AlertRule) -> AlertOut:
        return cls(
            rule=row.name, severity=row.severity, condition=rule_of(row).condition.text(),
            service=state.service, device_id=state.device_id, value=state.value,
            fired_at=state.fired_at, message=state.message,
        )  # fmt: skip


@admin.get("/rules")
def rules(core: Core) -> dict[str, list[RuleOut]]:
    with core.sessions.begin() as s:
        return {"rules": [RuleOut.of(r) for r in list_rules(s)]}


@admin.post("/rules", status_code=201)
def add(core: Core, body: RuleIn) -> RuleOut:
    """Add a rule; its condition in the compact form, parsed on the hub (400 with one line)."""
    with core.sessions.begin() as s:
        row = add_rule(
            s, name=body.name, condition=body.condition, service=body.service,
            severity=body.severity, max_rules=core.settings.alert_max_rules,
        )  # fmt: skip
        s.flush()
        return RuleOut.of(row)


@admin.delete("/rules/{name}", status_code=204)
def remove(core: Core, name: str) -> Response:
    """Remove a rule; each of its firing alerts resolves (an ``alert.resolved`` event)."""
    with core.sessions.begin() as s:
        remove_rule(s, name)
    return Response(status_code=204)


@admin.get("")
def active(
    core: Core, limit: Annotated[int, Query(ge=1, le=MAX_ACTIVE_LISTED)] = MAX_ACTIVE_LISTED
) -> dict[str, list[AlertOut]]:
    """The alerts firing now, newest first."""
    with core.sessions.begin() as s:
        return {"alerts": [AlertOut.of(state, row) for state, row in active_alerts(s, limit=limit)]}


def _check_metrics_token(request: Request, hub: Hub) -> None:
    settings = hub.core.settings
    if settings.metrics_public:
        return
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("metrics token required: send 'Authorization: Bearer <token>'")
    allowed = [hub.core.admin_token]
    if settings.metrics_token is not None:
        allowed.append(settings.metrics_token.get_secret_value())
    if not any(secrets.compare_digest(token.encode(), t.encode()) for t in allowed):
        raise Unauthorized("metrics token is not valid")


@router.get("/metrics", tags=["monitoring"])
def metrics(request: Request, hub: Hub) -> Response:
    """Prometheus text format: fleet gauges, ingest, publish backlog, alerts, API latencies."""
    _check_metrics_token(request, hub)
    return Response(generate_latest(hub.metrics.registry), media_type=CONTENT_TYPE_LATEST)


router.include_router(admin)
