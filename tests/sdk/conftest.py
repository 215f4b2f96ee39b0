"""SDK test fixtures: the real parts the agent tests use, and SDK objects wired to them.

``hub`` (a real hub over HTTP) and ``fleet`` (a hub with the Mosquitto it manages and real
agent processes) come from the hub's and the agent's fixtures, imported as
``tests/agent/conftest.py`` imports the hub's. ``sdk_home`` is an ``EDGEPACK_HOME`` holding the
signing key the test hubs trust, so the SDK signs what they accept.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from manifests.signing import private_key_pem
from packager.sdk import Hub
from tests.agent.conftest import Fleet, fleet  # noqa: F401  (fixtures)
from tests.conftest import Publisher
from tests.hub.broker_fixtures import *  # noqa: F403  (Mosquitto fixtures)
from tests.hub.conftest import HubFactory, RunningHub, blob_backend, forge, hub  # noqa: F401  (fixtures)


@pytest.fixture
def sdk_home(tmp_path: Path, publisher: Publisher, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``EDGEPACK_HOME`` with the trusted publisher's key where ``edgepack keygen`` puts it."""
    home = tmp_path / "edgepack-home"
    key = home / "keys" / "publisher.key"
    key.parent.mkdir(parents=True)
    key.write_bytes(private_key_pem(publisher.key))
    key.chmod(0o600)
    monkeypatch.setenv("EDGEPACK_HOME", str(home))
    for name in ("EDGEPACK_HUB_URL", "EDGEPACK_TOKEN", "EDGEPACK_HUB_CA"):
        monkeypatch.delenv(name, raising=False)
    return home


def sdk_hub(running: RunningHub, **options: object) -> Hub:
    """An SDK ``Hub`` on a running test hub, silent (no progress bars)."""
    return Hub(running.url, running.admin_token, progress=False, **options)  # type: ignore[arg-type]


@pytest.fixture
def hub_sdk(hub: HubFactory, sdk_home: Path) -> Iterator[Hub]:  # noqa: F811
    """A fresh hub (no broker) and an SDK ``Hub`` on it."""
    with sdk_hub(hub()) as connected:
        yield connected

