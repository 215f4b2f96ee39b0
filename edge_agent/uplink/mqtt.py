"""The agent's MQTT session (paho-mqtt 2.x, MQTT 3.1.1).

- Persistent session: client id = device id, ``clean_session=False``, so the broker keeps the
  device's subscriptions and queued QoS 1 messages while it is away.
- Reconnects with exponential backoff and **full jitter** capped at 60 s (a fleet that lost
  its broker must not come back in lockstep); paho's own reconnect has no jitter, so this
  module runs the connect loop itself. Only a session that lasted ``short_session_s``
  forgives the backoff: a connect that succeeds is not enough.
- Notices a session **taken over**: two agents with one device's credentials (a cloned SD
  card, a forgotten test box) connect with the same client id, and the broker closes one
  session each time the other connects. MQTT 3.1.1 (which RabbitMQ's plugin speaks too) gives
  no reason for that close, but the pattern is plain: the broker ends a session within
  seconds of accepting it, and accepts the next connect at once, again and again (about twice
  a second without backoff). After ``takeover_threshold`` such sessions in a row the device
  says so once in its reported state (``link_problem``, which the hub records as an event)
  and the backoff, no longer forgiven, spaces the fight out to one every few tens of seconds.
- Last will ``online=false`` (retained); ``online=true`` retained on every connect.
- Subscribes to its own ``desired`` and ``logs-request`` topics.
- The reported state is *latest wins*: while the broker is away only the newest report is
  kept, and it is published (retained) on every connect.

Everything received is handed to ``on_event`` from paho's thread; the callback must not block.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
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

#: What the device reports (``link_problem``) while its session keeps being taken over.
TAKEN_OVER = (
    "the broker keeps closing this device's session moments after accepting it: another client "
    "connects with the device's id (two agents running with one device's credentials?); stop "
    "the other one, or enroll it as a device of its own"
)


@dataclass
class SessionWatch:
    """Tells a session taken over by another client with the device's id from other losses.
    Pure: the caller passes the monotonic time.

    A session that the broker ended less than ``short_s`` after accepting it is *short*;
    ``threshold`` short sessions in a row, each reconnect accepted at once, are a takeover. A
    connect that fails breaks the row (a broker that is away, not a rival). The problem is
    forgotten after a session that lasted ``clear_after_s``."""

    short_s: float = 10.0
    threshold: int = 3
    clear_after_s: float = 300.0
    short_in_row: int = 0
    problem: str | None = None
    _began: float | None = None

    def connected(self, now: float) -> None:
        self._began = now

    def unreachable(self) -> None:
        self.short_in_row = 0

    def lost(self, now: float) -> bool | None:
        """A session ended that we did not end: whether it was short (``None`` when no session
        had been accepted: a refused CONNACK)."""
        began, self._began = self._began, None
        if began is None:
            return None
        lasted = now - began
        if lasted >= self.clear_after_s:
            self.problem = None
        if lasted >= self.short_s:
            self.short_in_row = 0
            return False
        self.short_in_row += 1
        if self.short_in_row >= self.threshold:
            self.problem = TAKEN_OVER
        return True


class MqttSession:
    def __init__(
        self,
        credentials: DeviceCredentials,
        on_event: Callable[[MqttEvent], None],
        *,
        keepalive_s: int = 30,
        max_backoff_s: float = 60.0,
        short_session_s: float = 10.0,
        takeover_threshold: int = 3,
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
        # A switch to rotated credentials: reconnect at once, not after a backoff, and end the
        # persistent session of the account left (its user name and password).
        self._switching = False
        self._left: tuple[str, str] | None = None
        self._tls = client_context(credentials) if endpoint.tls else None
        self._account = (endpoint.username, endpoint.password)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._latest_report: bytes | None = None
        self._connected = False
        # Connects since the last session that lasted short_session_s (the backoff's exponent).
        self.attempts = 0
        self.watch = SessionWatch(short_s=short_session_s, threshold=takeover_threshold)
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

    def switch(self, credentials: DeviceCredentials, *, timeout_s: float = 30.0) -> bool:
        """Reconnect with ``credentials``' broker user and password (rotated credentials):
        the current session ends with a DISCONNECT (no last will, ``online`` stays true) and
        the next connect uses the new account. Whether the new session is up within
        ``timeout_s``."""
        endpoint = credentials.mqtt
        with self._lock:
            self._switching = True
            self._connected = False
            if endpoint.username != self._account[0]:
                self._left = self._account
            self._account = (endpoint.username, endpoint.password)
        self._client.username_pw_set(endpoint.username, endpoint.password)
        self._client.disconnect()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.connected:
                return True
            time.sleep(0.05)
        return False

    def _end_session(self, username: str, password: str) -> None:
        """Connect once more as the account just left, with a clean session, and disconnect:
        the broker drops that account's persistent session (Mosquitto names a session by the
        user) instead of queueing its messages for a client that will never come back."""
        done = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self._device, protocol=mqtt.MQTTv311, clean_session=True
        )
        client.username_pw_set(username, password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.on_connect = lambda *_: done.set()
        try:
            client.connect(self.host, self.port, keepalive=self._keepalive)
            deadline = time.monotonic() + 10
            while not done.is_set() and time.monotonic() < deadline:
                client.loop(timeout=0.2)
            client.disconnect()
        except (OSError, ValueError) as exc:
            log.info("broker: the session of %s was not ended (%s)", username, exc)

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client.connect(self.host, self.port, keepalive=self._keepalive)
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.watch.unreachable()
                self._failed(f"cannot reach {self.host}:{self.port} ({exc})")
                continue
            self._client.loop_forever()  # returns when the connection is lost
            with self._lock:
                switching, self._switching = self._switching, False
                left, self._left = self._left, None
            if left is not None:
                self._end_session(*left)
            if not self._stop.is_set() and not switching:
                self._lost()

    def _lost(self) -> None:
        with self._lock:
            known = self.watch.problem
            short = self.watch.lost(time.monotonic())
            problem = self.watch.problem
        if short is False:
            self.attempts = 0  # the session was steady: a fresh start, not a fight
        if problem is not None and known is None:
            log.warning("broker: %s", problem)
        self._failed("session taken over" if problem is not None and short else "connection lost")

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
            problem = self.watch.problem
        if connected:
            report = with_link_problem(payload, problem)
            self._client.publish(self.topic(REPORTED), report, qos=1, retain=True)

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
        client.subscribe([(self.topic(DESIRED), 1), (self.topic(LOGS_REQUEST), 1)])
        client.publish(self.topic(ONLINE), b"true", qos=1, retain=True)
        with self._lock:
            self._connected = True
            self.watch.connected(time.monotonic())
            report = self._latest_report
            problem = self.watch.problem
        if report is not None:
            client.publish(self.topic(REPORTED), with_link_problem(report, problem), qos=1, retain=True)
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


def with_link_problem(report: bytes, problem: str | None) -> bytes:
    """The reported state the loop made, with the session's own problem in ``link_problem``
    (the loop knows the services; only the session knows what the broker does to it)."""
    if problem is None:
        return report
    document = json.loads(report)
    document["link_problem"] = problem
    return json.dumps(document, separators=(",", ":")).encode()
