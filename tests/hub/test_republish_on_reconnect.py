"""A broker restarted without persistence gets every device's desired state back by itself."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import Publisher
from tests.hub.broker_fixtures import MqttProbe, plain_config, start_mosquitto
from tests.hub.conftest import HubFactory
from tests.hub.fleet_support import deploy, enroll, hub_trust, push, verified_state


def test_hub_republishes_desired_states_when_the_broker_comes_back(
    hub: HubFactory, publisher: Publisher, tmp_path: Path, topic_prefix: str
) -> None:
    broker = start_mosquitto(tmp_path / "first", plain_config)
    h = hub(mqtt_host=broker.host, mqtt_port=broker.port, topic_prefix=topic_prefix, mqtt_username=None)
    second = None
    try:
        mod = push(h, publisher, "digits", "1")
        with h.client() as http:
            enroll(http, "r1", site="berlin")
            assert deploy(http, "digits", mod, selector="site=berlin").status_code == 201
        assert h.process.link is not None and h.process.link.wait_connected(10)

        broker.stop()  # no persistence: every retained message is gone with it
        deadline = time.monotonic() + 30
        while h.process.link.connected:
            assert time.monotonic() < deadline, "the hub did not notice the broker going away"
            time.sleep(0.05)
        second = start_mosquitto(tmp_path / "second", plain_config, port=broker.port)
        # paho's reconnect backoff grows to 30 s while the broker is away.
        assert h.process.link.wait_connected(60), "the hub did not reconnect"

        probe = MqttProbe.connect(second.host, second.port)
        try:
            assert probe.subscribe(f"{topic_prefix}/devices/r1/desired") == [1]
            # Retained if the hub republished before this subscription, live if after.
            msg = probe.expect(lambda m: m.payload != b"", timeout=30)
            state = verified_state(msg.payload, hub_trust(h), "r1")
            assert [m.service for m in state.modules] == ["digits"]
        finally:
            probe.close()
    finally:
        h.stop()
        if second is not None:
            second.stop()
