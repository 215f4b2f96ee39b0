"""The hub's MQTT link and the broker config it generates, against a real Mosquitto."""

from __future__ import annotations

import queue
import subprocess
import time
from pathlib import Path

import pytest

from cloud_hub.broker.mosquitto import (
    MosquittoAccounts,
    render_acl,
)
from cloud_hub.broker.passwords import check_password, hash_password
from cloud_hub.core import HubCore
from cloud_hub.fleet.tables import Device
from cloud_hub.mqtt.link import MqttLink
from cloud_hub.settings import HubSettings
from manifests.errors import FetchError
from tests.hub.broker_fixtures import (
    Broker,
    BrokerFactory,
    MqttProbe,
    free_port,
    plain_config,
    start_mosquitto,
)

pytestmark = pytest.mark.sql_independent

HUB_PASSWORD = "hub-secret"


def _link(broker: Broker, prefix: str, **kw: object) -> MqttLink:
    link = MqttLink(host=broker.host, port=broker.port, prefix=prefix, **kw)  # type: ignore[arg-type]
    link.start()
    assert link.wait_connected(10)
    return link


def test_desired_state_is_published_retained_and_cleared(mosquitto: Broker, topic_prefix: str) -> None:
    link = _link(mosquitto, topic_prefix)
    try:
        link.publish_desired("dev-1", b'{"signed": 1}')
        link.publish_desired("dev-2", b'{"signed": 2}')
    finally:
        link.stop()

    # A device that connects later still gets its state: the message is retained.
    late = mosquitto.probe()
    try:
        late.subscribe(f"{topic_prefix}/devices/dev-1/desired")
        msg = late.expect(lambda m: m.topic.endswith("dev-1/desired"))
        assert (msg.payload, msg.retain) == (b'{"signed": 1}', True)
    finally:
        late.close()

    link = _link(mosquitto, topic_prefix)
    try:
        link.clear_desired("dev-1")
    finally:
        link.stop()
    after = mosquitto.probe()
    try:
        after.subscribe(f"{topic_prefix}/devices/+/desired")
        got = after.received_within(lambda m: True, 1.0)
        assert [(m.topic, m.payload) for m in got] == [
            (f"{topic_prefix}/devices/dev-2/desired", b'{"signed": 2}')
        ]
    finally:
        after.close()


def test_publish_without_a_broker_raises_fetch_error(topic_prefix: str) -> None:
    link = MqttLink(host="127.0.0.1", port=free_port(), prefix=topic_prefix, connect_wait_s=0.2)
    link.start()
    try:
        with pytest.raises(FetchError, match="not connected to the broker"):
            link.publish_desired("dev-1", b"x")
    finally:
        link.stop()


def test_password_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "u1", "s3cret"], check=True)
    theirs = pwfile.read_text().strip().split(":", 1)[1]
    assert check_password("s3cret", theirs)
    assert not check_password("wrong", theirs)
    assert check_password("s3cret", hash_password("s3cret"))


def test_acl_lists_only_each_devices_own_topics() -> None:
    acl = render_acl(prefix="ep", hub_username="hub", device_ids=["b", "a"])
    assert acl.splitlines()[1:] == [
        "user hub",
        "topic readwrite ep/#",
        "",
        "user a",
        "topic read ep/devices/a/desired",
        "topic read ep/devices/a/logs-request",
        "topic write ep/devices/a/reported",
        "topic write ep/devices/a/telemetry",
        "topic write ep/devices/a/online",
        "topic write ep/devices/a/logs-response",
        "",
        "user b",
        "topic read ep/devices/b/desired",
        "topic read ep/devices/b/logs-request",
        "topic write ep/devices/b/reported",
        "topic write ep/devices/b/telemetry",
        "topic write ep/devices/b/online",
        "topic write ep/devices/b/logs-response",
    ]


def test_sync_broker_follows_the_device_table(tmp_path: Path, broker_factory: BrokerFactory) -> None:
    broker_dir = tmp_path / "broker"
    settings = HubSettings(
        data_dir=tmp_path / "data",
        broker_dir=broker_dir,
        mqtt_password=HUB_PASSWORD,
        broker_pid_file=None,
    )
    core = HubCore.open(settings)
    try:
        MosquittoAccounts(core.sessions, settings).sync()  # only the hub so far
        broker = broker_factory(broker_dir)
        accounts = MosquittoAccounts(
            core.sessions, settings.model_copy(update={"broker_pid_file": broker.pid_file})
        )
        with pytest.raises(ConnectionRefusedError):
            broker.probe(username="dev-new", password="pw-new")

        with core.sessions.begin() as s:
            s.add(Device(id="dev-new", tags={}, mqtt_password_hash=hash_password("pw-new"), token_hash="t1"))
        accounts.sync()
        _eventually_connects(broker, "dev-new", "pw-new")

        with core.sessions.begin() as s:
            dev = s.get(Device, "dev-new")
            assert dev is not None
            dev.revoked = True
        accounts.sync()
        _eventually_refused(broker, "dev-new", "pw-new")
        broker.probe(username="edgepack-hub", password=HUB_PASSWORD).close()
    finally:
        core.close()


def _eventually_connects(broker: Broker, user: str, password: str) -> None:
    # SIGHUP is asynchronous: the broker reloads between its network iterations.
    import time

    for _ in range(100):
        try:
            broker.probe(username=user, password=password).close()
            return
        except ConnectionRefusedError:
            time.sleep(0.05)
    raise AssertionError(f"{user} was never let in after the reload")


def _eventually_refused(broker: Broker, user: str, password: str) -> None:
    import time

    for _ in range(100):
        try:
            MqttProbe.close(broker.probe(username=user, password=password))
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{user} was still let in after the reload")


def test_link_reconnects_and_subscribes_again_after_a_broker_restart(
    tmp_path: Path, topic_prefix: str
) -> None:
    received: queue.Queue[str] = queue.Queue()
    broker = start_mosquitto(tmp_path / "first", plain_config)
    link = MqttLink(
        host=broker.host,
        port=broker.port,
        prefix=topic_prefix,
        max_backoff_s=1,
        sink=lambda topic, _payload, _retained: received.put(topic),
    )
    link.start()
    second: Broker | None = None
    try:
        assert link.wait_connected(10)
        broker.stop()
        deadline = time.monotonic() + 10
        while link.connected:
            assert time.monotonic() < deadline, "the link did not notice the broker going away"
            time.sleep(0.05)
        with pytest.raises(FetchError):
            link.publish_desired("dev-1", b"while down")

        second = start_mosquitto(tmp_path / "second", plain_config, port=broker.port)
        assert link.wait_connected(20), "the link did not reconnect"
        device = second.probe()
        try:
            device.publish(f"{topic_prefix}/devices/dev-1/reported", b"{}")
        finally:
            device.close()
        assert received.get(timeout=10) == f"{topic_prefix}/devices/dev-1/reported"
        link.publish_desired("dev-1", b"after restart")
    finally:
        link.stop()
        if second is not None:
            second.stop()
