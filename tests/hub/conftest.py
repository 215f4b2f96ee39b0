"""Hub test fixtures: a real hub (uvicorn on an ephemeral port) and a real Mosquitto."""

from __future__ import annotations

from tests.hub.broker_fixtures import *  # noqa: F403  (Mosquitto fixtures)
