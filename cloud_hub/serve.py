"""Running the hub under uvicorn (``edgepack hub serve``)."""

from __future__ import annotations

import uvicorn

from cloud_hub.app import create_app
from cloud_hub.settings import HubSettings
from cloud_hub.tls.material import with_default_tls


def serving_settings(settings: HubSettings) -> HubSettings:
    """The settings a hub serves with: its own certificate when it has one, and no plain HTTP
    beyond loopback unless asked for (see :func:`cloud_hub.tls.material.with_default_tls`)."""
    return with_default_tls(settings)


def run_hub(settings: HubSettings, *, log_level: str = "info") -> None:
    """Serve the hub until interrupted: HTTPS when it has a certificate (its own, from
    ``broker-config --tls``, is used by default), and never plain HTTP beyond loopback unless
    ``allow_plain_http`` says so."""
    settings = with_default_tls(settings)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )
