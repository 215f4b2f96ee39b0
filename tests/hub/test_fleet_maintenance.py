"""The fleet's background upkeep: renewing expiring states and republishing retained ones."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from cloud_hub.fleet.maintenance import FleetMaintenance
from cloud_hub.fleet.tables import DeviceDesired
from tests.hub.broker_fixtures import Broker, MqttProbe
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import enroll, hub_trust, verified_state


def generation_of(hub: RunningHub, device_id: str) -> int:
    with hub.core.sessions.begin() as s:
        row = s.get(DeviceDesired, device_id)
        assert row is not None
        return row.generation


def test_maintenance_renews_and_republishes(hub: HubFactory, mosquitto: Broker, topic_prefix: str) -> None:
    h = hub(
        mqtt_host=mosquitto.host,
        mqtt_port=mosquitto.port,
        topic_prefix=topic_prefix,
        mqtt_username=None,
        desired_ttl_s=3600,
    )
    with h.client() as http:
        enroll(http, "edge-1")
        enroll(http, "edge-2")
    with h.core.sessions.begin() as s:
        row = s.get(DeviceDesired, "edge-1")
        assert row is not None
        row.expires = datetime.now(UTC) + timedelta(minutes=1)

    assert h.process.publisher is not None
    upkeep = FleetMaintenance(
        renew=h.process.fleet.renew_expiring, republish=h.process.publisher.republish_all, interval_s=0.1
    )
    upkeep.start()
    try:
        deadline = time.monotonic() + 20
        while generation_of(h, "edge-1") < 2:
            assert time.monotonic() < deadline, "the expiring state was not renewed"
            time.sleep(0.05)
        assert generation_of(h, "edge-2") == 1  # not due, not touched

        # The broker forgets edge-2's retained state; a republish request brings it back.
        wiper = MqttProbe.connect(mosquitto.host, mosquitto.port)
        wiper.publish(f"{topic_prefix}/devices/edge-2/desired", b"", retain=True)
        wiper.close()
        upkeep.request_republish()
        probe = MqttProbe.connect(mosquitto.host, mosquitto.port)
        try:
            deadline = time.monotonic() + 20
            while True:
                assert probe.subscribe(f"{topic_prefix}/devices/edge-2/desired") == [1]
                got = probe.received_within(lambda m: m.retain and m.payload != b"", 0.5)
                if got:
                    break
                assert time.monotonic() < deadline, "the retained state was not republished"
            state = verified_state(got[0].payload, hub_trust(h), "edge-2")
            assert state.generation == 1
        finally:
            probe.close()
    finally:
        upkeep.stop()


def test_a_failing_round_does_not_stop_the_loop(hub: HubFactory) -> None:
    h = hub(desired_ttl_s=3600)
    with h.client() as http:
        enroll(http, "edge-1")
    broken = True

    def renew() -> dict[str, int]:
        if broken:
            raise RuntimeError("database unreachable")
        return h.process.fleet.renew_expiring()

    upkeep = FleetMaintenance(renew=renew, republish=None, interval_s=0.05)
    upkeep.run_once()  # logs, does not raise
    broken = False
    with h.core.sessions.begin() as s:
        row = s.get(DeviceDesired, "edge-1")
        assert row is not None
        row.expires = datetime.now(UTC) + timedelta(minutes=1)
    upkeep.run_once()
    assert generation_of(h, "edge-1") == 2
