"""Real Mosquitto brokers for the hub tests (star-imported by ``tests/hub/conftest.py``).

- ``mosquitto``: one plain broker per test session (per xdist worker), anonymous access, on an
  ephemeral loopback port. Tests keep out of each other's way with ``topic_prefix``, a fresh
  prefix per test, so retained messages of one test are never seen by another.
- ``broker_factory``: starts a broker from a hub-generated broker dir (password file + ACL,
  see ``cloud_hub.broker.mosquitto``), writes its pid file so the hub can SIGHUP it, and
  stops it when the test ends.
- ``MqttProbe``: a real paho client acting as a device or an observer in a test.
"""

from __future__ import annotations

import os
import queue
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_hub.broker.mosquitto import BrokerTLS, render_config
from tests.conftest import free_port  # re-exported: fixtures and tests start brokers on it
from tests.engines import ENGINE_START_ATTEMPTS, EngineFailed, listens, start_on_free_ports

__all__ = [
    "MOSQUITTO",
    "Broker",
    "BrokerFactory",
    "MqttProbe",
    "broker_factory",
    "free_port",
    "mosquitto",
    "plain_config",
    "start_mosquitto",
    "topic_prefix",
]

MOSQUITTO = Path("/usr/sbin/mosquitto")


@dataclass
class Broker:
    """A running Mosquitto process."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    config: Path
    log: Path
    pid_file: Path

    def reload(self) -> None:
        """SIGHUP: reload the password file and ACL."""
        self.process.send_signal(1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def probe(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        tls_ca: Path | None = None,
    ) -> MqttProbe:
        """A connected client on this broker (stopped by the caller or at test end); with
        ``tls_ca`` it connects with TLS and verifies the broker against that CA."""
        return MqttProbe.connect(
            self.host, self.port, username=username, password=password, client_id=client_id, tls_ca=tls_ca
        )


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        # This process's own listener: a connect would also succeed on whoever took the port.
        if listens(process.pid, port):
            return True
        time.sleep(0.02)
    return False


def start_mosquitto(
    workdir: Path, config_for_port: Callable[[int], str], *, port: int | None = None,
    attempts: int = ENGINE_START_ATTEMPTS,
) -> Broker:  # fmt: skip
    """Start Mosquitto with the config ``config_for_port(port)`` on a free loopback port
    (another if that one was taken meanwhile), or on ``port``, e.g. to restart a broker where
    its clients expect it (tried again while the old listener lets go of it)."""
    workdir.mkdir(parents=True, exist_ok=True)

    def launch(ports: list[int]) -> Broker:
        port_now = ports[0]
        config = workdir / "mosquitto.conf"
        config.write_text(config_for_port(port_now))
        log = workdir / "mosquitto.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        if _wait_listening(port_now, process, timeout=10):
            pid_file = workdir / "mosquitto.pid"
            pid_file.write_text(f"{process.pid}\n")
            return Broker("127.0.0.1", port_now, process, config, log, pid_file)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        raise EngineFailed(log.read_text(errors="replace"))

    if port is None:
        return start_on_free_ports("mosquitto", 1, launch, attempts=attempts)
    return start_on_free_ports("mosquitto", 1, launch, attempts=attempts, pick=lambda _: [port], pause_s=0.5)


def _run_as() -> str | None:
    # As root Mosquitto would switch to the 'mosquitto' user and lose access to tmp files.
    return "root" if os.geteuid() == 0 else None


def plain_config(port: int) -> str:
    """An anonymous broker on ``port`` (what the session-wide ``mosquitto`` runs)."""
    run_as = _run_as()
    return (
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 100000\n" + (f"user {run_as}\n" if run_as else "")
    )


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A plain broker (anonymous) shared by the tests of one session."""
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"), plain_config)
    yield broker
    broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses (pass it as the hub's ``topic_prefix``)."""
    return f"t{uuid.uuid4().hex[:12]}"


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def broker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerFactory]:
    """``start(broker_dir, tls=None)``: a broker enforcing the hub-generated password file and
    ACL (listening with TLS only when ``tls`` is given)."""
    started: list[Broker] = []

    def start(broker_dir: Path, tls: BrokerTLS | None = None) -> Broker:
        workdir = tmp_path_factory.mktemp("mosquitto-secured")
        broker = start_mosquitto(
            workdir, lambda port: render_config(broker_dir, port=port, run_as=_run_as(), tls=tls)
        )
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class MqttProbe:
    """A paho client that records everything it receives, for tests acting as a device."""

    client: mqtt.Client
    messages: queue.Queue[Received] = field(default_factory=queue.Queue)
    suback: queue.Queue[list[int]] = field(default_factory=queue.Queue)
    disconnects: int = 0

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes] | None = None,
        timeout: float = 10,
        client_id: str | None = None,
        tls_ca: Path | None = None,
        reconnect: bool = True,
    ) -> MqttProbe:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=reconnect,
        )
        probe = cls(client)
        connack: queue.Queue[Any] = queue.Queue()
        client.on_connect = lambda _c, _u, _f, reason, _p: connack.put(reason)
        client.on_message = lambda _c, _u, msg: probe.messages.put(
            Received(msg.topic, bytes(msg.payload), bool(msg.retain))
        )

        def on_disconnect(*_: Any) -> None:
            probe.disconnects += 1

        client.on_disconnect = on_disconnect
        client.on_subscribe = lambda _c, _u, _mid, reasons, _p: probe.suback.put([r.value for r in reasons])
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        if tls_ca is not None:
            client.tls_set(ca_certs=str(tls_ca))
        client.connect(host, port, keepalive=30)
        client.loop_start()
        try:
            reason = connack.get(timeout=timeout)
        except queue.Empty:
            client.loop_stop()
            raise RuntimeError(f"no CONNACK from {host}:{port}") from None
        if reason.is_failure:
            client.loop_stop()
            client.disconnect()
            raise ConnectionRefusedError(f"broker refused {username!r}: {reason}")
        return probe

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10) -> list[int]:
        """Subscribe and return the SUBACK codes (0x80 = refused)."""
        self.client.subscribe(topic, qos)
        return self.suback.get(timeout=timeout)

    def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False, timeout: float = 10
    ) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            info.wait_for_publish(timeout)

    def expect(self, predicate: Callable[[Received], bool], timeout: float = 10) -> Received:
        """The first received message that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("the expected MQTT message did not arrive")
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate(msg):
                return msg

    def received_within(self, predicate: Callable[[Received], bool], seconds: float) -> list[Received]:
        """Every message matching ``predicate`` received during the next ``seconds``."""
        out: list[Received] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                break
            if predicate(msg):
                out.append(msg)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
