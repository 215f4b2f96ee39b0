"""Parallel deploys, retags and pushes against one hub: nothing lost, generations only rise."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import httpx

from cloud_hub.fleet.desired import take_fleet_lock
from tests.conftest import Publisher
from tests.factory import Forge, default_files
from tests.hub.broker_fixtures import Broker, MqttProbe
from tests.hub.conftest import HubFactory
from tests.hub.fleet_support import deploy, desired_over_http, enroll, hub_trust, push, verified_state

SERVICES = 8
PUSHES = 4
DEVICES = ["edge-1", "edge-2", "edge-3"]


def test_parallel_deploys_and_pushes_lose_nothing(
    hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str
) -> None:
    h = hub(mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None)
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        tokens = {d: enroll(http, d, site="berlin").token for d in DEVICES}
    probe = MqttProbe.connect(mosquitto.host, mosquitto.port)
    assert probe.subscribe(f"{topic_prefix}/devices/+/desired") == [1]
    forge = Forge(publisher=publisher.key)

    def deploy_one(i: int) -> httpx.Response:
        with h.client() as http:
            return deploy(http, f"svc-{i}", mod, selector="site=berlin", port=9000 + i)

    def push_one(i: int) -> httpx.Response:
        bundle = forge.bundle(files=default_files(100 + i), name=f"pushed-{i}", version="1")
        with h.client() as http:
            return http.post("/api/v1/modules", content=bundle)

    jobs: list[Callable[[], httpx.Response]] = [partial(deploy_one, i) for i in range(SERVICES)]
    jobs += [partial(push_one, i) for i in range(PUSHES)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda job: job(), jobs))
    deploys, pushes = responses[:SERVICES], responses[SERVICES:]
    assert all(r.status_code == 201 for r in responses), [r.text for r in responses if r.status_code != 201]

    # Every deploy gave every device its own generation: no two deploys shared one.
    for device_id in DEVICES:
        issued = sorted(r.json()["issued"][device_id] for r in deploys)
        assert issued == list(range(2, 2 + SERVICES)), (device_id, issued)

    # No deployment was lost: each device's final state holds all of them, signed.
    trust = hub_trust(h)
    wanted = sorted(f"svc-{i}" for i in range(SERVICES))
    final: dict[str, bytes] = {}
    for device_id, token in tokens.items():
        final[device_id] = desired_over_http(h, token)
        state = verified_state(final[device_id], trust, device_id)
        assert state.generation == 1 + SERVICES
        assert sorted(m.service for m in state.modules) == wanted
        assert sorted(m.settings.port for m in state.modules) == [9000 + i for i in range(SERVICES)]

    # The registry holds every pushed module, whole.
    with h.client() as http:
        listed: list[dict[str, Any]] = http.get("/api/v1/modules").json()
        names = {m["name"] for m in listed}
        assert {f"pushed-{i}" for i in range(PUSHES)} | {"digits"} <= names
        for r in pushes:
            body = r.json()
            manifest = http.get(f"/api/v1/modules/{body['name']}/versions/1/manifest")
            assert manifest.status_code == 200

    # Over MQTT each device saw strictly rising generations, ending at the final state.
    seen: dict[str, list[int]] = {d: [] for d in DEVICES}
    try:
        while any(not g or g[-1] < 1 + SERVICES for g in seen.values()):
            msg = probe.expect(lambda m: m.payload != b"")
            device_id = msg.topic.split("/")[-2]
            seen[device_id].append(json.loads(msg.payload)["signed"]["generation"])
            if seen[device_id][-1] == 1 + SERVICES:
                assert msg.payload == final[device_id]
    finally:
        probe.close()
    for device_id, generations in seen.items():
        assert generations == sorted(set(generations)), (device_id, generations)


def test_parallel_retags_and_deploys_end_consistent(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        tokens = {d: enroll(http, d, site="berlin").token for d in DEVICES}

    def retag(device_id: str, site: str) -> httpx.Response:
        with h.client() as http:
            return http.patch(f"/api/v1/devices/{device_id}", json={"set": {"site": site}})

    def deploy_one(i: int) -> httpx.Response:
        with h.client() as http:
            return deploy(http, f"svc-{i}", mod, selector="site=munich", port=9100 + i)

    jobs: list[Callable[[], httpx.Response]] = [partial(deploy_one, i) for i in range(4)]
    jobs += [partial(retag, d, "munich") for d in DEVICES]
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda job: job(), jobs))
    assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses]

    trust = hub_trust(h)
    for device_id, token in tokens.items():
        state = verified_state(desired_over_http(h, token), trust, device_id)
        assert sorted(m.service for m in state.modules) == [f"svc-{i}" for i in range(4)]
        issued = sorted(r.json()["issued"][device_id] for r in responses if device_id in r.json()["issued"])
        assert issued == sorted(set(issued)) and issued[-1] == state.generation


def test_fleet_changes_are_serialised_by_the_database_lock(hub: HubFactory) -> None:
    h = hub()
    order: list[str] = []

    def second_change() -> None:
        h.process.fleet.change(lambda _s: order.append("second change runs"))

    with h.core.sessions.begin() as session:
        take_fleet_lock(session)
        worker = threading.Thread(target=second_change)
        worker.start()
        # Give the second change every chance to run; it must wait for this transaction.
        worker.join(timeout=0.5)
        order.append("first change commits")
    worker.join(timeout=30)
    assert order == ["first change commits", "second change runs"]
