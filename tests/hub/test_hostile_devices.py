"""Issue 8: what one enrolled (or compromised) device must not be able to do to the others,
to the hub or to its dashboard. Each test failed before the fix that came with it."""

from __future__ import annotations

import time
from pathlib import Path

from cloud_hub.broker.mosquitto import BrokerUser, write_broker_files
from cloud_hub.broker.passwords import hash_password
from tests.hub.broker_fixtures import BrokerFactory


def test_a_device_cannot_knock_another_off_the_broker_with_its_client_id(
    tmp_path: Path, broker_factory: BrokerFactory
) -> None:
    prefix = "ids"
    write_broker_files(
        tmp_path / "broker",
        prefix=prefix,
        hub=BrokerUser("edgepack-hub", hash_password("hub-pw")),
        devices=[BrokerUser("dev-a", hash_password("pw-a")), BrokerUser("dev-b", hash_password("pw-b"))],
    )
    broker = broker_factory(tmp_path / "broker")
    hub_side = broker.probe(username="edgepack-hub", password="hub-pw")
    victim = broker.probe(username="dev-a", password="pw-a", client_id="dev-a")
    # The attacker logs in with its own credentials but claims the victim's client id; MQTT
    # says the broker must then close the older session with that id.
    attacker = broker.probe(username="dev-b", password="pw-b", client_id="dev-a")
    try:
        assert hub_side.subscribe(f"{prefix}/devices/+/online") == [1]
        time.sleep(1.0)
        assert victim.disconnects == 0, "the victim's connection was closed"
        victim.publish(f"{prefix}/devices/dev-a/online", b"true")
        assert hub_side.expect(lambda m: m.topic.endswith("dev-a/online")).payload == b"true"
        # The attacker is connected as itself and nothing more.
        attacker.publish(f"{prefix}/devices/dev-b/online", b"true")
        assert hub_side.expect(lambda m: m.topic.endswith("dev-b/online")).payload == b"true"
    finally:
        attacker.close()
        victim.close()
        hub_side.close()
