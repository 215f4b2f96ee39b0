"""The agent's MQTT session (paho-mqtt 2.x, MQTT 3.1.1).

- Persistent session: client id = device id, ``clean_session=False``, so the broker keeps the
  device's subscriptions and queued QoS 1 messages while it is away.
- Reconnects with exponential backoff and **full jitter** capped at 60 s (a fleet that lost
  its broker must not come back in lockstep); paho's own reconnect has no jitter, so this
  module runs the connect loop itself.
- Last will ``online=false`` (retained); ``online=true`` retained on every connect.
- Subscribes to its own ``desired`` and ``logs-request`` topics.
- The reported state is *latest wins*: while the broker is away only the newest report is
  kept, and it is published (retained) on every connect.

Everything received is handed to ``on_event`` from paho's thread; the callback must not block.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.backoff import full_jitter
from edge_agent.uplink.tls import client_context
from manifests.device import DeviceCredentials
from manifests.topics import DESIRED, LOGS_REQUEST, LOGS_RESPONSE, ONLINE, REPORTED, TELEMETRY, device_topic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Connected:
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class DesiredMessage:
    payload: bytes
    source: str = "mqtt"


@dataclass(frozen=True)
class LogRequestMessage:
    payload: bytes


MqttEvent = Connected | Disconnected | DesiredMessage | LogRequestMessage


class MqttSession:
    def __init__(
        self,
        credentials: DeviceCredentials,
        on_event: Callable[[MqttEvent], None],
        *,
        keepalive_s: int = 30,
        max_backoff_s: float = 60.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        endpoint = credentials.mqtt
        if endpoint.host is None:
            raise ValueError("the credentials name no broker")
        self.host = endpoint.host
        self.port = endpoint.port
        self._device = credentials.device_id
        self._prefix = endpoint.topic_prefix
        self._on_event = on_event
        self._keepalive = keepalive_s
        self._max_backoff = max_backoff_s
        self._rand = rand
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._latest_report: bytes | None = None
        self._connected = False
        self.attempts = 0  # consecutive failed connects (for tests and status)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=credentials.device_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
            reconnect_on_failure=False,
        )
        client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.tls:
            client.tls_set_context(client_context(credentials))
        client.will_set(self.topic(ONLINE), b"false", qos=1, retain=True)
        # Telemetry and reports must not pile up in memory while the broker is away.
        client.max_queued_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    def topic(self, channel: str) -> str:
        return device_topic(self._device, channel, prefix=self._prefix)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgepack-mqtt", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Say ``online=false`` (retained) when connected, then disconnect."""
        self._stop.set()
        with self._lock:
            connected = self._connected
        if connected:
            info = self._client.publish(self.topic(ONLINE), b"false", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2.0)
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client.connect(self.host, self.port, keepalive=self._keepalive)
            except (OSError, ValueError) as exc:
                self._failed(f"cannot reach {self.host}:{self.port} ({exc})")
                continue
            self._client.loop_forever()  # returns when the connection is lost
            if not self._stop.is_set():
                self._failed("connection lost")

    def _failed(self, why: str) -> None:
        delay = full_jitter(self.attempts, self._rand(), cap_s=self._max_backoff)
        self.attempts += 1
        log.info("broker: %s; retrying in %.1fs", why, delay)
        self._stop.wait(delay)

    # --- publishing (any thread) -------------------------------------------------------------

    def publish_reported(self, payload: bytes) -> None:
        """Publish retained now if connected; else keep it (only the newest) for the next connect."""
        with self._lock:
            self._latest_report = payload
            connected = self._connected
        if connected:
            self._client.publish(self.topic(REPORTED), payload, qos=1, retain=True)

    def publish_telemetry(self, payload: bytes) -> bool:
        if not self.connected:
            return False  # a sample that cannot go now is not worth keeping
        self._client.publish(self.topic(TELEMETRY), payload, qos=0)
        return True

    def publish_logs(self, payload: bytes) -> None:
        if self.connected:
            self._client.publish(self.topic(LOGS_RESPONSE), payload, qos=1)

    # --- paho callbacks (network thread) -----------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("broker %s:%s refused the device: %s", self.host, self.port, reason)
            client.disconnect()
            return
        self.attempts = 0
        client.subscribe([(self.topic(DESIRED), 1), (self.topic(LOGS_REQUEST), 1)])
        client.publish(self.topic(ONLINE), b"true", qos=1, retain=True)
        with self._lock:
            self._connected = True
            report = self._latest_report
        if report is not None:
            client.publish(self.topic(REPORTED), report, qos=1, retain=True)
        log.info("connected to the broker %s:%s", self.host, self.port)
        self._on_event(Connected(bool(getattr(flags, "session_present", False))))

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
        if was:
            self._on_event(Disconnected(str(reason)))

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if msg.topic == self.topic(DESIRED):
            if payload:  # an empty retained message only clears the topic
                self._on_event(DesiredMessage(payload))
        elif msg.topic == self.topic(LOGS_REQUEST):
            self._on_event(LogRequestMessage(payload))
