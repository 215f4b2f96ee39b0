"""The same attacks against both brokers the hub manages: Mosquitto (its generated password
file and ACL) and a three-node RabbitMQ cluster (users and permissions set through the
management API). A device may read only its own ``desired``/``logs-request`` and write only
its own ``reported``/``telemetry``/``online``/``logs-response``; nobody else gets in.

The brokers differ in how they refuse (Mosquitto drops a forbidden message silently, RabbitMQ
refuses the subscription or closes the connection); the tests check what matters to the
fleet: what reaches whom.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_hub.broker.mosquitto import BrokerUser, write_broker_files
from cloud_hub.broker.passwords import hash_password, rabbit_hash
from cloud_hub.broker.rabbitmq import (
    DEVICE_TAG,
    HUB_PERMISSIONS,
    HUB_TAG,
    ManagementApi,
    RabbitUser,
    apply_accounts,
    device_permissions,
)
from manifests.topics import DEVICE_READS, DEVICE_WRITES
from tests.hub.broker_fixtures import BrokerFactory, MqttProbe
from tests.hub.rabbitmq_fixtures import ADMIN, RabbitCluster

# One worker runs the whole module, with the other RabbitMQ tests: one three-node cluster
# (about 40 s to start) serves them all.
pytestmark = [pytest.mark.scale_out, pytest.mark.xdist_group("rabbitmq")]

HUB = ("edgepack-hub", "hub-secret")


@dataclass
class Secured:
    """A broker whose accounts the hub's code set: the hub and devices ``a`` and ``b``."""

    kind: str
    prefix: str
    a: str
    b: str
    hub_at: tuple[str, int]
    device_at: tuple[str, int]  # on RabbitMQ another node than the hub's
    set_devices: Callable[[dict[str, str]], None]

    def hub(self) -> MqttProbe:
        return MqttProbe.connect(*self.hub_at, username=HUB[0], password=HUB[1])

    def device(self, name: str, password: str | None = None) -> MqttProbe:
        """Connected as the agent connects: its device id as user name and client id.

        Never reconnected by paho: a connection the broker closed stays closed. Otherwise a
        forger's reconnect, a second after RabbitMQ cut it off, raced the next connection
        under the same client id, and the cluster's id registry (which takes the one it
        registers last) could close the newer, honest one, whose resent QoS 1 message then
        arrived twice (in a loop of this test, 3 of 24 honest connections were closed that way,
        2 with a message delivered twice; without paho's reconnect, 0 of 40).
        """
        return MqttProbe.connect(
            *self.device_at,
            username=name,
            password=password or f"pw-{name}",
            client_id=name,
            reconnect=False,
        )

    def topic(self, device: str, channel: str) -> str:
        return f"{self.prefix}/devices/{device}/{channel}"


def _mosquitto(tmp_path: Path, broker_factory: BrokerFactory) -> Secured:
    prefix, broker_dir = "edgepack", tmp_path / "broker"
    hub = BrokerUser(HUB[0], hash_password(HUB[1]))

    def set_devices(devices: dict[str, str]) -> None:
        users = [BrokerUser(name, hash_password(pw)) for name, pw in devices.items()]
        write_broker_files(broker_dir, prefix=prefix, hub=hub, devices=users)

    set_devices({"dev-a": "pw-dev-a", "dev-b": "pw-dev-b"})
    broker = broker_factory(broker_dir)

    def set_and_reload(devices: dict[str, str]) -> None:
        set_devices(devices)
        broker.reload()

    at = (broker.host, broker.port)
    return Secured("mosquitto", prefix, "dev-a", "dev-b", at, at, set_and_reload)


def _rabbitmq(cluster: RabbitCluster) -> Secured:
    prefix = f"p{uuid.uuid4().hex[:8]}"
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    hub = RabbitUser(HUB[0], rabbit_hash(HUB[1]), HUB_TAG, HUB_PERMISSIONS)

    def set_devices(devices: dict[str, str]) -> None:
        users = [
            RabbitUser(n, rabbit_hash(pw), DEVICE_TAG, device_permissions(n, prefix))
            for n, pw in devices.items()
        ]
        api = ManagementApi(cluster.api, *ADMIN)
        try:
            apply_accounts(api, [hub, *users])
        finally:
            api.close()

    set_devices({a: f"pw-{a}", b: f"pw-{b}"})
    hub_node, device_node = cluster.nodes[0], cluster.nodes[-1]
    hub_at, device_at = ("127.0.0.1", hub_node.mqtt_port), ("127.0.0.1", device_node.mqtt_port)
    return Secured("rabbitmq", prefix, a, b, hub_at, device_at, set_devices)


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Secured:
    if request.param == "mosquitto":
        return _mosquitto(tmp_path, request.getfixturevalue("broker_factory"))
    return _rabbitmq(request.getfixturevalue("rabbitmq"))


@contextlib.contextmanager
def closing(*probes: MqttProbe) -> Iterator[None]:
    try:
        yield
    finally:
        for p in probes:
            with contextlib.suppress(Exception):
                p.close()


def refused(connect: Callable[[], MqttProbe]) -> bool:
    try:
        connect().close()
    except ConnectionRefusedError:
        return True
    return False


def eventually(predicate: Callable[[], bool], seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def try_subscribe(probe: MqttProbe, topic: str) -> list[int] | None:
    """The SUBACK codes, or None when the broker answered by closing the connection."""
    try:
        return probe.subscribe(topic, timeout=1.5)
    except Exception:
        return None


def test_only_the_right_password_gets_in(secured: Secured) -> None:
    secured.device(secured.a).close()
    secured.hub().close()
    assert refused(lambda: secured.device(secured.a, password=f"pw-{secured.b}"))
    assert refused(lambda: secured.device("stranger", password=f"pw-{secured.a}"))
    assert refused(lambda: MqttProbe.connect(*secured.device_at))  # anonymous


def test_a_device_reads_only_its_own_topics(secured: Secured) -> None:
    s = secured
    hub, dev = s.hub(), s.device(s.a)
    with closing(hub):
        # Every way to read B's messages: its topics by name, by wildcards, everything.
        forbidden = [s.topic(s.b, c) for c in DEVICE_READS]
        for topic in (*forbidden, f"{s.prefix}/devices/+/desired", f"{s.prefix}/#", "#"):
            codes = try_subscribe(dev, topic)
            if codes is None or not dev.client.is_connected():
                dev.close()  # refused by closing the connection (RabbitMQ): connect again
                dev = s.device(s.a)
            elif s.kind == "rabbitmq":
                assert codes == [0x80], topic
            # (Mosquitto grants the SUBACK and filters each message by the ACL instead.)
        for channel in DEVICE_READS:
            assert dev.subscribe(s.topic(s.a, channel)) == [1]
        time.sleep(0.5)  # subscriptions settle on every node
        for channel in DEVICE_READS:
            hub.publish(s.topic(s.b, channel), b"for-b")
            hub.publish(s.topic(s.a, channel), b"for-a")
        try:
            got = dev.received_within(lambda m: True, 1.5)
        finally:
            dev.close()
        assert sorted((m.topic, m.payload) for m in got) == sorted(
            (s.topic(s.a, c), b"for-a") for c in DEVICE_READS
        )


def test_a_device_writes_only_its_own_topics(secured: Secured) -> None:
    s = secured
    hub = s.hub()
    with closing(hub):
        assert hub.subscribe(f"{s.prefix}/devices/+/+") == [1]
        time.sleep(0.5)
        for channel in DEVICE_WRITES:
            forger = s.device(s.a)
            with closing(forger), contextlib.suppress(Exception):
                forger.publish(s.topic(s.b, channel), b"forged", timeout=1)  # as B
            forger = s.device(s.a)
            with closing(forger), contextlib.suppress(Exception):
                forger.publish(s.topic(s.a, "desired"), b"forged", timeout=1)  # its own state, unsigned
        honest = s.device(s.a)
        with closing(honest):
            for channel in DEVICE_WRITES:
                honest.publish(s.topic(s.a, channel), b"mine")
        got = hub.received_within(lambda m: True, 2.0)
        assert [m for m in got if m.payload == b"forged"] == []
        assert sorted(m.topic for m in got if m.payload == b"mine") == sorted(
            s.topic(s.a, c) for c in DEVICE_WRITES
        )


def test_a_revoked_device_is_locked_out(secured: Secured) -> None:
    s = secured
    s.device(s.b).close()
    s.set_devices({s.a: f"pw-{s.a}"})  # b revoked
    assert eventually(lambda: refused(lambda: s.device(s.b)))
    s.device(s.a).close()
