"""Deployments reach devices as retained, signed desired states on a real Mosquitto."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from cloud_hub.broker.mosquitto import prepare_broker_dir
from cloud_hub.events import recent_events
from cloud_hub.settings import HubSettings
from manifests.desired import DesiredState
from manifests.signing import TrustStore
from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker, BrokerFactory, MqttProbe, Received
from tests.hub.conftest import HubFactory
from tests.hub.fleet_support import deploy, desired_over_http, enroll, hub_trust, push, verified_state


class DesiredWatch:
    """A subscriber on every device's desired topic that checks each state as an agent would."""

    def __init__(self, probe: MqttProbe, prefix: str, trust: TrustStore) -> None:
        self.probe, self.prefix, self.trust = probe, prefix, trust
        self.generations: dict[str, list[int]] = {}
        assert probe.subscribe(f"{prefix}/devices/+/desired") == [1]

    def device_of(self, msg: Received) -> str:
        return msg.topic.removeprefix(f"{self.prefix}/devices/").removesuffix("/desired")

    def next_state(self, device_id: str, *, min_generation: int = 1) -> tuple[DesiredState, bytes]:
        """The next state for ``device_id`` with at least ``min_generation``, verified."""
        msg = self.probe.expect(
            lambda m: (
                self.device_of(m) == device_id
                and m.payload != b""
                and json.loads(m.payload)["signed"]["generation"] >= min_generation
            )
        )
        state = verified_state(msg.payload, self.trust, device_id)
        seen = self.generations.setdefault(device_id, [])
        assert not seen or state.generation > seen[-1], (seen, state.generation)
        seen.append(state.generation)
        return state, msg.payload

    def cleared(self, device_id: str) -> None:
        self.probe.expect(lambda m: self.device_of(m) == device_id and m.payload == b"")


def services(state: DesiredState) -> list[str]:
    return [m.service for m in state.modules]


def test_deploy_publishes_retained_signed_state_per_device(
    hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str
) -> None:
    h = hub(mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None)
    mod = push(h, publisher, "digits", "1")
    trust = hub_trust(h)
    probe = MqttProbe.connect(mosquitto.host, mosquitto.port)
    try:
        watch = DesiredWatch(probe, topic_prefix, trust)
        with h.client() as http:
            b1 = enroll(http, "b1", site="berlin")
            b2 = enroll(http, "b2", site="berlin")
            m1 = enroll(http, "m1", site="munich")
            for dev in (b1, b2, m1):
                state, _ = watch.next_state(dev.id)
                assert (state.generation, services(state)) == (1, [])

            r = deploy(http, "digits", mod, selector="site=berlin", port=8890)
            assert r.status_code == 201 and r.json()["published"] is True
            for dev in (b1, b2):
                state, payload = watch.next_state(dev.id, min_generation=2)
                assert state.generation == 2 and services(state) == ["digits"]
                assert state.modules[0].manifest_digest == mod.digest
                assert state.modules[0].settings.port == 8890
                # The HTTP copy is the very same signed bytes.
                assert desired_over_http(h, dev.token) == payload

            late = enroll(http, "b3", site="berlin")
            state, _ = watch.next_state(late.id)
            assert (state.generation, services(state)) == (1, ["digits"])

            assert http.patch("/api/v1/devices/b2", json={"set": {"site": "munich"}}).status_code == 200
            state, _ = watch.next_state("b2", min_generation=3)
            assert (state.generation, services(state)) == (3, [])

            assert http.post("/api/v1/devices/b1/revoke").json()["published"] is True
            watch.cleared("b1")
    finally:
        probe.close()

    # A device connecting now gets exactly the latest state of each device, retained.
    fresh = MqttProbe.connect(mosquitto.host, mosquitto.port)
    try:
        assert fresh.subscribe(f"{topic_prefix}/devices/+/desired") == [1]
        got = {m.topic.split("/")[-2]: m for m in fresh.received_within(lambda m: m.retain, 1.5)}
        assert sorted(got) == ["b2", "b3", "m1"]
        assert json.loads(got["b2"].payload)["signed"]["generation"] == 3
        assert json.loads(got["b3"].payload)["signed"]["generation"] == 1

        # A broker that lost its retained messages gets them back from the hub's database.
        fresh.publish(f"{topic_prefix}/devices/b2/desired", b"", retain=True)
        assert h.process.publisher is not None and h.process.publisher.republish_all() == []
    finally:
        fresh.close()
    again = MqttProbe.connect(mosquitto.host, mosquitto.port)
    try:
        assert again.subscribe(f"{topic_prefix}/devices/b2/desired") == [1]
        msg = again.expect(lambda m: m.retain)
        assert verified_state(msg.payload, trust, "b2").generation == 3
    finally:
        again.close()


HUB_PASSWORD = "hub-secret-for-tests"


def _connect_when_reloaded(broker: Broker, user: str, password: str) -> MqttProbe:
    # The broker reloads its password file on SIGHUP between network iterations.
    deadline = time.monotonic() + 10
    while True:
        try:
            return MqttProbe.connect(broker.host, broker.port, username=user, password=password)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_enrolled_device_reads_only_its_own_desired_state_on_a_secured_broker(
    hub: HubFactory,
    publisher: Publisher,
    broker_factory: BrokerFactory,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    broker_dir = tmp_path / "broker"
    prepare_broker_dir(
        HubSettings(
            data_dir=tmp_path / "prep",
            broker_dir=broker_dir,
            topic_prefix=topic_prefix,
            mqtt_password=SecretStr(HUB_PASSWORD),
        )
    )
    broker = broker_factory(broker_dir)
    h = hub(
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_password=HUB_PASSWORD,
        broker_dir=broker_dir,
        broker_pid_file=broker.pid_file,
        topic_prefix=topic_prefix,
    )
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        a = enroll(http, "dev-a", site="berlin")
        enroll(http, "dev-b", site="munich")
        assert deploy(http, "digits", mod, selector="site=berlin").json()["published"] is True
    device = _connect_when_reloaded(broker, "dev-a", a.mqtt_password)
    try:
        assert device.subscribe(f"{topic_prefix}/devices/dev-a/desired") == [1]
        msg = device.expect(lambda m: m.topic.endswith("/dev-a/desired"))
        state = verified_state(msg.payload, hub_trust(h), "dev-a")
        assert msg.retain and state.generation == 2 and services(state) == ["digits"]
        # Mosquitto's acl_file grants the SUBSCRIBE but never delivers B's retained state.
        device.subscribe(f"{topic_prefix}/devices/+/desired")
        others = device.received_within(lambda m: not m.topic.endswith("/dev-a/desired"), 1.0)
        assert others == []
    finally:
        device.close()

    with h.client() as http:
        assert http.post("/api/v1/devices/dev-a/revoke").status_code == 200
    deadline = time.monotonic() + 10
    while True:
        try:
            MqttProbe.connect(broker.host, broker.port, username="dev-a", password=a.mqtt_password).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "a revoked device can still log in to the broker"
        time.sleep(0.1)


def test_broker_down_does_not_lose_a_deployment(
    hub: HubFactory, publisher: Publisher, topic_prefix: str, request: pytest.FixtureRequest
) -> None:
    # A port held but never listened on: connections are refused, and no other test takes it.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    request.addfinalizer(dead.close)
    port = dead.getsockname()[1]
    h = hub(mqtt_host="127.0.0.1", mqtt_port=port, topic_prefix=topic_prefix, mqtt_username=None)
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        dev = enroll(http, "edge-1", site="berlin")
        r = deploy(http, "digits", mod, selector="site=berlin")
        assert r.status_code == 201
        assert r.json()["published"] is False
        assert "edge-1: " in r.json()["publish_errors"][0]
    state = verified_state(desired_over_http(h, dev.token), hub_trust(h), "edge-1")
    assert services(state) == ["digits"] and state.generation == 2
    with h.core.sessions.begin() as s:
        kinds = [e.kind for e in recent_events(s)]
    assert "publish-failed" in kinds
