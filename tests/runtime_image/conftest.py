"""The runtime image tests run against a real engine and registry (tests/docker_fixtures.py)."""

from __future__ import annotations

from tests.docker_fixtures import *  # noqa: F403  (docker_engine, registry, runtime_image)
