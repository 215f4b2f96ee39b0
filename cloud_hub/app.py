"""The hub's FastAPI application.

Route handlers open their own transaction (``with core.sessions.begin() as s``) so that a
commit failure turns into an error response instead of happening after a 200 was sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cloud_hub.api import alerts, dashboard, data, endpoint_certs, fleet, install, join, registry, webhooks
from cloud_hub.api.body_limit import BodyLimit
from cloud_hub.api.docs import install_docs
from cloud_hub.api.downloads import DeviceDownloads
from cloud_hub.api.errors import install_error_handlers
from cloud_hub.metrics import RequestTimer
from cloud_hub.settings import HubSettings
from cloud_hub.wiring import HubProcess, open_hub


def create_app(
    settings: HubSettings | None = None, *, hub: HubProcess | None = None, close_hub: bool = False
) -> FastAPI:
    """A hub app; pass ``hub`` to serve an already-wired process (tests), else it wires one
    from ``settings`` at start-up and closes it at shutdown. ``close_hub``: close the given
    ``hub`` at shutdown too ('edgepack hub serve': uvicorn raises the SIGTERM it caught again
    once it has shut down, so the process ends there and nothing after ``Server.run()`` runs)."""
    served = hub.core.settings if hub is not None else settings or HubSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = hub is None
        process = hub or open_hub(served)
        app.state.hub = process
        if own:
            process.start()
        try:
            yield
        finally:
            if own or close_hub:
                process.close()

    app = FastAPI(
        title="edgepack hub",
        version="0.1.0",
        description="Model and module registry, devices, deployments, fleet state.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    app.add_middleware(BodyLimit, settings=served)
    # Device downloads are answered here, before the body limit and FastAPI's routing.
    app.add_middleware(DeviceDownloads)
    install_error_handlers(app)
    # Outermost, so that a request the body limit refuses is timed as well.
    app.add_middleware(RequestTimer)
    app.include_router(registry.router)
    app.include_router(fleet.router)
    app.include_router(join.router)
    app.include_router(join.admin)
    app.include_router(join.pending)
    app.include_router(dashboard.router)
    app.include_router(endpoint_certs.router)
    app.include_router(alerts.router)
    app.include_router(webhooks.router)
    app.include_router(data.device_router)
    app.include_router(data.admin_router)
    app.include_router(install.router)
    return app
