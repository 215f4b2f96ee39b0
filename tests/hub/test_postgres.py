"""The hub on a real PostgreSQL server: the story SQLite cannot vouch for.

SQLite serialises every writer, so version and generation allocation, the fleet lock and JSON
columns can look right there and still race or fail on PostgreSQL. These tests run the hub on
the ``postgres`` fixture's throwaway server (a fresh database per hub), over real HTTP and a
real Mosquitto; the concurrency, registry and restart checks are the very tests the SQLite
suite runs, handed a hub factory that puts the hub on PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from cloud_hub.events import Event
from manifests.canonical import canonical_json
from tests.conftest import Publisher
from tests.factory import Forge
from tests.hub import test_concurrency as concurrency
from tests.hub import test_hub_restart as restart
from tests.hub import test_registry_models as models
from tests.hub.broker_fixtures import Broker, MqttProbe
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import deploy, desired_over_http, enroll, hub_trust, push, verified_state


@pytest.fixture
def pg_hub(hub: HubFactory, postgres: str) -> HubFactory:
    """The ``hub`` factory, but every new hub gets its own database on the PostgreSQL server."""

    def start(**overrides: Any) -> RunningHub:
        running = hub(postgres=postgres, **overrides)
        # Proof the tests below exercise PostgreSQL, not a silent fallback to the SQLite file.
        assert running.core.sessions.engine.dialect.name == "postgresql"
        assert not (running.data_dir / "hub.db").exists()
        return running

    return start


def report(device_id: str, digest: str, state: str, reason: str | None = None) -> bytes:
    now = datetime.now(UTC).isoformat()
    return json.dumps(
        {
            "schema": "edgepack.reported/v1",
            "device_id": device_id,
            "reported_at": now,
            "agent_version": "0.1.0-pg",
            "applied_generation": 2,
            "modules": [
                {
                    "service": "digits",
                    "manifest_digest": digest,
                    "state": state,
                    "reason": reason,
                    "since": now,
                }
            ],
        }
    ).encode()


def rolled_up(client: httpx.Client, state: str) -> dict[str, Any]:
    body: dict[str, Any] = restart.wait_for(
        client, "/api/v1/deployments/digits", lambda d: d["state"] == state
    )
    return body


def test_fleet_story_on_postgres(
    pg_hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str
) -> None:
    h = pg_hub(
        mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None
    )
    weights = canonical_json({"factor": 2})
    mod = push(h, publisher, "digits", "1")
    device = MqttProbe.connect(mosquitto.host, mosquitto.port)

    def tell(device_id: str, state: str, reason: str | None = None) -> None:
        topic = f"{topic_prefix}/devices/{device_id}/reported"
        device.publish(topic, report(device_id, mod.digest, state, reason), retain=True)

    try:
        with h.client() as client:
            made = models.register(client, "digits", {"model.json": weights}, tags={"stage": "prod"})
            assert made.status_code == 201, made.text
            devices = {
                "berlin-1": enroll(client, "berlin-1", site="berlin"),
                "berlin-2": enroll(client, "berlin-2", site="berlin"),
                "munich-1": enroll(client, "munich-1", site="munich"),
            }
            r = deploy(client, "digits", mod, selector="site=berlin")
            assert r.status_code == 201, r.text
            assert r.json()["issued"] == {"berlin-1": 2, "berlin-2": 2}

            # Reported state over the real broker, rolled up over the targeted devices.
            for device_id in ("berlin-1", "berlin-2"):
                device.publish(f"{topic_prefix}/devices/{device_id}/online", b"true", retain=True)
            tell("berlin-1", "Healthy")
            tell("berlin-2", "Transitioning")
            rolled_up(client, "Transitioning")
            tell("berlin-2", "Failed", "init() raised: model missing")
            failed = rolled_up(client, "Failed")
            assert {(d["device_id"], d["state"], d["reason"]) for d in failed["devices"]} == {
                ("berlin-1", "Healthy", None),
                ("berlin-2", "Failed", "init() raised: model missing"),
            }
            tell("berlin-2", "Healthy")
            rolled_up(client, "Healthy")

            # A retag re-targets: munich-1 joins the selector and gets the deployment.
            retag = client.patch("/api/v1/devices/munich-1", json={"set": {"site": "berlin"}})
            assert retag.status_code == 200, retag.text
            joined = rolled_up(client, "Transitioning")
            assert {d["device_id"]: d["state"] for d in joined["devices"]}["munich-1"] == "Pending"
            tell("munich-1", "Healthy")
            healthy = rolled_up(client, "Healthy")
            assert sorted(d["device_id"] for d in healthy["devices"]) == ["berlin-1", "berlin-2", "munich-1"]

            with h.core.sessions.begin() as s:
                kinds = [(e.kind, e.device_id) for e in s.scalars(select(Event).order_by(Event.id))]
            assert ("failed", "berlin-2") in kinds and ("healthy", "munich-1") in kinds
            before = {
                "models": client.get("/api/v1/models").json(),
                "devices": client.get("/api/v1/devices").json(),
                "deployment": healthy,
                "desired": {d: desired_over_http(h, e.token) for d, e in devices.items()},
            }
    finally:
        device.close()

    # Restart on the same database without the broker: all of it comes back from PostgreSQL.
    again = h.restart(mqtt_host=None)
    assert again.overrides["db"] == h.overrides["db"]
    with again.client() as client:
        assert client.get("/api/v1/models").json() == before["models"]
        assert client.get("/api/v1/devices").json() == before["devices"]
        assert client.get("/api/v1/deployments/digits").json() == before["deployment"]
        for device_id, enrolled in devices.items():
            payload = desired_over_http(again, enrolled.token)
            assert payload == before["desired"][device_id]
            assert verified_state(payload, hub_trust(again), device_id).modules[0].service == "digits"
        # Generations keep rising across the restart.
        r = deploy(client, "digits", mod, selector="site=berlin", port=8891)
        assert r.status_code == 200, r.text
        assert r.json()["issued"] == {"berlin-1": 3, "berlin-2": 3, "munich-1": 3}


def test_parallel_deploys_and_pushes_on_postgres(
    pg_hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str
) -> None:
    concurrency.test_parallel_deploys_and_pushes_lose_nothing(pg_hub, publisher, mosquitto, topic_prefix)


def test_parallel_retags_and_deploys_on_postgres(pg_hub: HubFactory, publisher: Publisher) -> None:
    concurrency.test_parallel_retags_and_deploys_end_consistent(pg_hub, publisher)


def test_fleet_lock_serialises_changes_on_postgres(pg_hub: HubFactory) -> None:
    concurrency.test_fleet_changes_are_serialised_by_the_database_lock(pg_hub)


def test_concurrent_model_registrations_on_postgres(pg_hub: HubFactory) -> None:
    models.test_concurrent_registrations_get_distinct_consecutive_versions(pg_hub)


def test_restart_loses_nothing_on_postgres(
    pg_hub: HubFactory, forge: Forge, mosquitto: Broker, topic_prefix: str
) -> None:
    restart.test_a_restart_loses_nothing(pg_hub, forge, mosquitto, topic_prefix)


def test_each_hub_gets_its_own_database(pg_hub: HubFactory, publisher: Publisher) -> None:
    first, second = pg_hub(), pg_hub()
    assert first.overrides["db"] != second.overrides["db"]
    push(first, publisher, "only-here", "1")
    with second.client() as client:
        assert client.get("/api/v1/modules").json() == []
