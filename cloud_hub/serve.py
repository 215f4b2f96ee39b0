"""Running the hub under uvicorn (``edgepack hub serve``)."""

from __future__ import annotations

import uvicorn

from cloud_hub.app import create_app
from cloud_hub.settings import HubSettings


def run_hub(settings: HubSettings, *, log_level: str = "info") -> None:
    """Serve the hub until interrupted."""
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level)
