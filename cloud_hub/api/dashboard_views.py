"""Routes: the dashboard's fleet views — summary, device pages, one device, one service.

Built for fleets of thousands: every listing is filtered, counted and paged in SQL
(:mod:`cloud_hub.overview.queries`), a page holds at most ``MAX_PAGE`` rows, and every query
parameter is bounded (a bad one is a 4xx in the hub's one JSON error shape). All routes need
the admin token or the dashboard's session cookie.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_hub.api.deps import Admin, Core
from cloud_hub.events import Event
from cloud_hub.fleet.deployments import check_service_name, get_deployment
from cloud_hub.fleet.desired import stored_state
from cloud_hub.fleet.devices import get_device
from cloud_hub.fleet.tables import Deployment, DeviceDesired
from cloud_hub.fleet.targeting import check_device_id
from cloud_hub.ingest.series import Point, service_series
from cloud_hub.ingest.state import device_module_statuses
from cloud_hub.ingest.tables import DeviceReport, TelemetrySample
from cloud_hub.overview.queries import (
    MAX_OFFSET,
    MAX_PAGE,
    MAX_SEARCH_CHARS,
    MAX_TAG_FILTERS,
    DeviceFilter,
    Rollout,
    ServiceDeviceRow,
    device_page,
    device_state,
    fleet_counts,
    rollout,
    service_devices_page,
)
from cloud_hub.rollouts.store import released, status_line
from cloud_hub.rollouts.tables import Rollout as StagedRollout
from manifests.reported import FailureDetail, ModuleStatus, Progress, Telemetry
from manifests.states import ServiceState, StateOnDevice

router = APIRouter(prefix="/api/v1/dashboard", tags=["dashboard"], dependencies=[Admin])

#: The summary lists at most this many services (a hub has tens, not thousands).
MAX_SUMMARY_SERVICES = 200
#: A service with at most this many devices lists them in the summary too (small fleets see
#: every device's state at a glance; large ones page through the service's own view).
INLINE_DEVICES = 10
#: A device page charts at most this many of the device's newest telemetry samples.
MAX_DEVICE_SAMPLES = 360
RECENT_EVENTS = 30
#: A device page's charts have one point per this many seconds.
DEVICE_BUCKET_S = 10

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"rows per page, at most {MAX_PAGE}")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="rows to skip")]


# --- bodies ----------------------------------------------------------------------------------


class FleetCountsOut(BaseModel):
    total: int = Field(description="active (not revoked) devices")
    online: int
    offline: int
    by_state: dict[str, int] = Field(description="devices by rolled-up state (Pending, Idle included)")


class RolloutOut(BaseModel):
    total: int = Field(description="devices the service targets")
    done: int = Field(description="devices serving the current version Healthy")
    by_state: dict[str, int] = Field(
        description="targeted devices by their state for it (Pending: not reported)"
    )


class ServiceDeviceOut(BaseModel):
    device_id: str
    online: bool
    state: str = Field(description="a service state, or Pending when the device has not reported it")
    reason: str | None = Field(description="one line, e.g. the cause of a failure")
    failure: FailureDetail | None = Field(
        default=None, description="while Failed: the failed version's traceback and log tail"
    )
    serving_version: str | None = None
    endpoint: str | None = None
    progress: Progress | None = None


class ServiceSummary(BaseModel):
    name: str
    module: str
    version: str
    manifest_digest: str
    target: dict[str, Any]
    state: ServiceState = Field(description="rolled up over the targeted devices (Unschedulable if none)")
    rollout: RolloutOut
    staged: str | None = Field(
        default=None, description="the last deploy's rollout in waves, as one line (docs/rollouts.md)"
    )
    devices: list[ServiceDeviceOut] | None = Field(
        default=None, description=f"every device, when the service has at most {INLINE_DEVICES}"
    )
    serving_instead: str | None = Field(
        default=None,
        description="when the service's version failed and its devices went back to an earlier one: "
        "the version they serve (the dashboard shows 'v3 failed — v2 serving')",
    )


class SummaryOut(BaseModel):
    devices: FleetCountsOut
    services: list[ServiceSummary]
    services_total: int


class DeviceRowOut(BaseModel):
    id: str
    tags: dict[str, str]
    online: bool
    last_seen: datetime | None
    agent_version: str | None
    state: str


class DevicePageOut(BaseModel):
    total: int = Field(description="devices matching the filters, over all pages")
    offset: int
    limit: int
    devices: list[DeviceRowOut]


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: str
    message: str
    device_id: str | None
    service: str | None


class ChartPoint(BaseModel):
    t: datetime = Field(description="start of the bucket")
    rps: float = Field(description="requests/s, summed over the devices")
    p50_ms: float | None = Field(description="median latency, ms (median over the devices)")
    p95_ms: float | None = Field(
        default=None, description="95th percentile latency, ms (median over the devices)"
    )
    error_pct: float | None = Field(
        default=None, description="errors per 100 requests in the bucket (None: no requests counted)"
    )
    run_p95_ms: float | None = Field(
        default=None, description="95th percentile of the module's run() alone, ms (median over the devices)"
    )

    @classmethod
    def of(cls, p: Point) -> ChartPoint:
        return cls(t=p.t, rps=p.requests_per_s, p50_ms=p.p50_ms, p95_ms=p.p95_ms, error_pct=p.error_pct,
                   run_p95_ms=p.run_p95_ms)  # fmt: skip


class DeviceViewOut(BaseModel):
    device: DeviceRowOut
    generation: int
    services: list[str] = Field(description="services its desired state assigns")
    applied_generation: int | None
    last_error: str | None
    desired_issued: datetime | None
    modules: list[ModuleStatus] = Field(description="each module as the device last reported it")
    telemetry: dict[str, list[ChartPoint]] = Field(description="per-service series of its newest samples")
    bucket_s: int = Field(
        default=DEVICE_BUCKET_S, description="seconds per chart point; a missing bucket is a gap"
    )
    latest_sample: Telemetry | None
    events: list[EventOut] = Field(description="its newest events, newest first")


class ServiceViewOut(BaseModel):
    service: ServiceSummary
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    total: int = Field(description="targeted devices matching the state filter, over all pages")
    offset: int
    limit: int
    devices: list[ServiceDeviceOut]
    events: list[EventOut] = Field(description="its newest events, newest first")


# --- shaping ---------------------------------------------------------------------------------


def _service_device_out(row: ServiceDeviceRow) -> ServiceDeviceOut:
    status = None
    if row.status is not None:
        with contextlib.suppress(ValidationError):
            status = ModuleStatus.model_validate(row.status)
    moving = status is not None and row.state is StateOnDevice.TRANSITIONING
    return ServiceDeviceOut(
        device_id=row.device_id,
        online=row.online,
        state=row.state.value,
        reason=row.reason,
        failure=status.failure if status is not None and row.state == ServiceState.FAILED.value else None,
        serving_version=status.serving_version if status is not None else None,
        endpoint=status.endpoint if status is not None else None,
        progress=status.progress if status is not None and moving else None,
    )


def _rollout_out(r: Rollout) -> RolloutOut:
    return RolloutOut(total=r.total, done=r.done, by_state=r.by_state)


def _service_summary(s: Session, row: Deployment, *, inline: bool) -> ServiceSummary:
    progress = rollout(s, row)
    devices = None
    if inline and progress.total <= INLINE_DEVICES:
        _, rows = service_devices_page(s, row, state=None, limit=INLINE_DEVICES, offset=0)
        devices = [_service_device_out(r) for r in rows]
    serving_instead = None
    if progress.state is ServiceState.FAILED:
        # A bounded look at the failed devices (the first page of them), not the whole fleet.
        _, failed = service_devices_page(
            s, row, state=ServiceState.FAILED.value, limit=INLINE_DEVICES, offset=0
        )
        older = Counter(
            d.serving_version
            for d in map(_service_device_out, failed)
            if d.serving_version is not None and d.serving_version != row.module_version
        )
        serving_instead = older.most_common(1)[0][0] if older else None
    return ServiceSummary(
        serving_instead=serving_instead,
        name=row.name,
        module=row.module_name,
        version=row.module_version,
        manifest_digest=row.manifest_digest,
        target=row.target,
        state=progress.state,
        rollout=_rollout_out(progress),
        staged=_staged(s, row.name),
        devices=devices,
    )


def _staged(s: Session, service: str) -> str | None:
    row = s.get(StagedRollout, service)
    return None if row is None else status_line(row, len(released(s, row)))


def _events(s: Session, where: Any) -> list[EventOut]:
    rows = s.scalars(select(Event).where(where).order_by(Event.id.desc()).limit(RECENT_EVENTS))
    return [
        EventOut(id=e.id, at=e.at, kind=e.kind, message=e.message, device_id=e.device_id, service=e.service)
        for e in rows
    ]


# --- routes ----------------------------------------------------------------------------------


@router.get("/summary", response_model=SummaryOut)
def summary(core: Core) -> SummaryOut:
    """Device counts (total, online/offline, by state) and every service with its roll-up."""
    with core.sessions.snapshot() as s:
        counts = fleet_counts(s)
        rows = list(s.scalars(select(Deployment).order_by(Deployment.name).limit(MAX_SUMMARY_SERVICES)))
        services = [_service_summary(s, r, inline=True) for r in rows]
        total_services = len(rows)
        if total_services == MAX_SUMMARY_SERVICES:
            total_services = len(list(s.scalars(select(Deployment.name))))
    return SummaryOut(
        devices=FleetCountsOut(
            total=counts.total, online=counts.online, offline=counts.offline, by_state=counts.by_state
        ),
        services=services,
        services_total=total_services,
    )


@router.get("/devices", response_model=DevicePageOut)
def devices(
    core: Core,
    q: Annotated[
        str | None, Query(max_length=MAX_SEARCH_CHARS, description="part of a device id or tag")
    ] = None,
    tag: Annotated[
        list[str] | None,
        Query(description=f"key:value, repeatable (all must match), at most {MAX_TAG_FILTERS}"),
    ] = None,
    state: Annotated[str | None, Query(max_length=20, description="a device state, e.g. Failed")] = None,
    online: Annotated[bool | None, Query(description="true: online only; false: offline only")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> DevicePageOut:
    """One page of active devices, by id, filtered; ``total`` counts every matching device."""
    wanted = DeviceFilter.parse(q=q, tags=tag or [], state=state, online=online)
    with core.sessions.snapshot() as s:
        page = device_page(s, wanted, limit=limit, offset=offset)
    return DevicePageOut(
        total=page.total,
        offset=page.offset,
        limit=page.limit,
        devices=[DeviceRowOut(**{**vars(d), "state": d.state.value}) for d in page.devices],
    )


@router.get("/devices/{device_id}", response_model=DeviceViewOut)
def device_view(core: Core, device_id: str) -> DeviceViewOut:
    """One device: its modules and their states and reasons, its telemetry, its recent events."""
    check_device_id(device_id)
    with core.sessions.snapshot() as s:
        device = get_device(s, device_id, active=True)
        desired = s.get(DeviceDesired, device_id)
        report = s.get(DeviceReport, device_id)
        services: list[str] = []
        if desired is not None and desired.payload is not None:
            services = [m.service for m in stored_state(desired.payload).modules]
        payloads = list(
            s.scalars(
                select(TelemetrySample.payload)
                .where(TelemetrySample.device_id == device_id)
                .order_by(TelemetrySample.id.desc())
                .limit(MAX_DEVICE_SAMPLES)
            )
        )
        row = DeviceRowOut(
            id=device.id,
            tags=dict(device.tags or {}),
            online=device.online,
            last_seen=device.last_seen,
            agent_version=device.agent_version,
            state=device_state(s, device_id).value,
        )
        modules = device_module_statuses(s, device_id)
        events = _events(s, Event.device_id == device_id)
        out = DeviceViewOut(
            device=row,
            generation=desired.generation if desired is not None else 0,
            services=services,
            applied_generation=report.applied_generation if report is not None else None,
            last_error=report.last_error if report is not None else None,
            desired_issued=desired.issued if desired is not None else None,
            modules=modules,
            telemetry={},
            latest_sample=None,
            events=events,
        )
    samples: list[Telemetry] = []
    for payload in payloads:
        # A row an older hub stored without today's checks costs its own point, not the page.
        with contextlib.suppress(ValidationError):
            samples.append(Telemetry.model_validate(payload))
    out.latest_sample = samples[0] if samples else None
    # Only the services it runs now: a deleted (or moved) service's chart goes with it.
    out.telemetry = {
        svc: [ChartPoint.of(p) for p in points]
        for svc, points in service_series(samples, bucket_s=DEVICE_BUCKET_S).items()
        if svc in services
    }
    return out


@router.get("/services/{name}", response_model=ServiceViewOut)
def service_view(
    core: Core,
    name: str,
    state: Annotated[
        str | None, Query(max_length=20, description="only devices in this state for it (or Pending)")
    ] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> ServiceViewOut:
    """One service: its rollout progress and a page of its devices with their state for it."""
    check_service_name(name)
    with core.sessions.snapshot() as s:
        row = get_deployment(s, name)
        total, rows = service_devices_page(s, row, state=state, limit=limit, offset=offset)
        return ServiceViewOut(
            service=_service_summary(s, row, inline=False),
            settings=row.settings,
            created_at=row.created_at,
            updated_at=row.updated_at,
            total=total,
            offset=offset,
            limit=limit,
            devices=[_service_device_out(r) for r in rows],
            events=_events(s, Event.service == name),
        )
