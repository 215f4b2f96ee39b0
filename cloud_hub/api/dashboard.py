"""Routes: the dashboard page, its login, and the JSON it polls (events, telemetry).

The page itself is static (``cloud_hub/dashboard/``); its script reads the fleet views
(summary, device pages, one device, one service: ``api.dashboard_views``), the models and the
modules, authenticated by the HttpOnly ``edgepack_admin`` cookie that the login form sets.
Events and telemetry come from the database, so every hub replica shows the same feed.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from dataclasses import asdict
from datetime import timedelta
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy import select

from cloud_hub.api import dashboard_views
from cloud_hub.api.csrf import check_dashboard_write
from cloud_hub.api.deps import ADMIN_COOKIE, Admin, Core, Hub
from cloud_hub.api.sessions import (
    SESSION_TTL,
    close_all_sessions,
    close_session,
    csrf_token,
    open_session,
)
from cloud_hub.db.base import utcnow
from cloud_hub.errors import NotFound, Throttled, Unauthorized
from cloud_hub.events import Event, events_since, recent_events, record_event
from cloud_hub.fleet.tables import Deployment
from cloud_hub.ingest.series import service_series
from cloud_hub.ingest.tables import TelemetrySample
from cloud_hub.login_throttle import client_key
from manifests.bounds import MAX_INT63
from manifests.reported import Telemetry

router = APIRouter()

#: The charts read at most this many (newest) samples per refresh, however large the fleet.
MAX_CHART_SAMPLES = 20_000

STATIC_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
    # uPlot, the charts' library, vendored from npm (scripts/vendor_uplot.py pins its sha256).
    "vendor/uPlot.iife.min.js": "text/javascript",
    "vendor/uPlot.min.css": "text/css",
    "vendor/uPlot.LICENSE": "text/plain",
}

#: Everything the page loads comes from the hub itself, and no inline script runs: a string a
#: device sent that reached the page as HTML still could not execute. (Scripts set element
#: styles through the DOM, which ``style-src 'self'`` allows; uPlot draws on a canvas.)
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise NotFound(f"no dashboard file {name!r}")
    path = resources.files("cloud_hub").joinpath("dashboard", *name.split("/"))
    headers = {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
    }
    return FileResponse(str(path), media_type=STATIC_FILES[name], headers=headers)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return _static("index.html")


@router.get("/dashboard/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    return _static(name)


@router.get("/dashboard/vendor/{name}", include_in_schema=False)
def vendored_file(name: str) -> FileResponse:
    return _static(f"vendor/{name}")


@router.post("/api/v1/dashboard/login", tags=["dashboard"])
def login(hub: Hub, request: Request, token: Annotated[str, Form()]) -> Response:
    """Exchange the admin token for a server-side session, in an HttpOnly cookie (``Secure``
    over HTTPS) that holds only the session's id; the answer carries the session's CSRF token.

    Wrong tokens are throttled per client address (:mod:`cloud_hub.login_throttle`): a blocked
    address gets 429 with ``Retry-After`` and its token is not even compared."""
    core, throttle = hub.core, hub.login_throttle
    client = client_key(request.client.host if request.client else None)
    attempt = throttle.admit(client)
    if attempt.retry_after_s > 0:
        wait = attempt.retry_after_s
        raise Throttled(
            f"too many wrong tokens from {client}; try again in {math.ceil(wait)} s", retry_after_s=wait
        )
    if not secrets.compare_digest(token.strip().encode(), core.admin_token.encode()):
        if attempt.episode_started:
            # Once per episode, not per attempt: the event log is not the attacker's to fill.
            with core.sessions.begin() as s:
                record_event(
                    s,
                    "signin-throttled",
                    f"dashboard sign-in from {client} throttled after "
                    f"{throttle.policy.free_failures} wrong admin tokens",
                )
        raise Unauthorized("that is not the admin token (see <data_dir>/admin_token on the hub)")
    throttle.succeeded(client)
    with core.sessions.begin() as s:
        session_id = open_session(s)
    response = JSONResponse({"ok": True, "csrf_token": csrf_token(session_id)})
    response.set_cookie(
        ADMIN_COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=int(SESSION_TTL.total_seconds()),
        path="/",
    )
    return response


@router.get("/api/v1/dashboard/session", tags=["dashboard"], dependencies=[Admin])
def session_info(request: Request) -> dict[str, str]:
    """This browser's session: its CSRF token, for the dashboard's script after a reload.
    (A page of another origin cannot read this answer: the hub allows no CORS.)"""
    session_id = request.cookies.get(ADMIN_COOKIE)
    if session_id is None:
        raise Unauthorized("this is the dashboard's session; sign in to the dashboard")
    return {"csrf_token": csrf_token(session_id)}


@router.post("/api/v1/dashboard/logout", tags=["dashboard"])
def logout(core: Core, request: Request) -> Response:
    """End this browser's session on the hub (its cookie is worth nothing afterwards)."""
    session_id = request.cookies.get(ADMIN_COOKIE)
    if session_id is not None:
        # Signing someone out is a change too: only the dashboard itself may ask for it.
        check_dashboard_write(request, core.settings, session_id)
        with core.sessions.begin() as s:
            close_session(s, session_id)
    response = JSONResponse({"ok": True})
    response.delete_cookie(ADMIN_COOKIE, path="/")
    return response


@router.delete("/api/v1/dashboard/sessions", tags=["dashboard"], dependencies=[Admin])
def end_all_sessions(core: Core) -> dict[str, int]:
    """Sign every browser out (e.g. after a laptop was lost)."""
    with core.sessions.begin() as s:
        return {"ended": close_all_sessions(s)}


def _event_out(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": e.at.isoformat(),
        "kind": e.kind,
        "message": e.message,
        "device_id": e.device_id,
        "service": e.service,
    }


@router.get("/api/v1/dashboard/events", tags=["dashboard"], dependencies=[Admin])
def events(
    core: Core,
    after: Annotated[int, Query(ge=0, le=MAX_INT63, description="only events with a higher id")] = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Events after ``after`` (the newest 50 when ``after`` is 0), oldest first."""
    with core.sessions.begin() as s:
        rows = events_since(s, after) if after else recent_events(s, limit=50)
        return {"events": [_event_out(e) for e in rows]}


@router.get("/api/v1/dashboard/ingest", tags=["dashboard"], dependencies=[Admin])
def ingest_status(hub: Hub) -> dict[str, Any]:
    """This replica's broker connection and ingest counters (since it started)."""
    link, worker = hub.link, hub.ingest
    return {
        "broker": None if link is None else f"{link.host}:{link.port}",
        "connected": link is not None and link.connected,
        "pending": worker.pending() if worker is not None else 0,
        "stats": asdict(worker.stats) if worker is not None else None,
    }


@router.get("/api/v1/dashboard/telemetry", tags=["dashboard"], dependencies=[Admin])
def telemetry(
    core: Core,
    minutes: Annotated[int, Query(ge=1, le=24 * 60)] = 15,
    bucket_s: Annotated[int, Query(ge=1, le=3600)] = 10,
) -> dict[str, Any]:
    """Per-service requests/s, error rate and p50/p95 latency over the last ``minutes``, for the
    charts: one point per ``bucket_s`` with data (a bucket without samples is a gap)."""
    since = utcnow() - timedelta(minutes=minutes)
    with core.sessions.begin() as s:
        payloads: list[dict[str, Any]] = list(
            s.scalars(
                select(TelemetrySample.payload)
                .where(TelemetrySample.received_at >= since)
                .order_by(TelemetrySample.id.desc())
                .limit(MAX_CHART_SAMPLES)
            )
        )
        # A deleted service's chart goes with it (its samples stay until they age out).
        services = set(s.scalars(select(Deployment.name)))
    samples = []
    for payload in payloads:
        # A row an older hub stored without today's checks costs its own point, not the chart.
        with contextlib.suppress(ValidationError):
            samples.append(Telemetry.model_validate(payload))
    series = service_series(samples, bucket_s=bucket_s)
    return {
        "bucket_s": bucket_s,
        "services": {
            svc: [dashboard_views.ChartPoint.of(p).model_dump(mode="json") for p in points]
            for svc, points in series.items()
            if svc in services
        },
    }


router.include_router(dashboard_views.router)
