"""The hub's MQTT session: publishes signed desired states, feeds device messages to ingest.

One paho-mqtt 2.x client (MQTT 3.1.1, so that RabbitMQ's MQTT plugin works as well as
Mosquitto) whose network loop runs in paho's own thread. paho reconnects by itself with an
exponential backoff (1 s doubling up to ``max_backoff_s``) and, on every connect, the link
subscribes again. Message callbacks only
hand the bytes to :class:`cloud_hub.ingest.worker.IngestWorker`, which never blocks, so a slow
database or a malformed message cannot stall the network loop (or the other devices).

Subscriptions, for several hub replicas on one broker:

- the ingest channels (``reported``, ``telemetry``, ``online``) as a *shared* subscription,
  ``$share/<share_group>/<prefix>/devices/+/<channel>``: the broker hands each message to one
  replica of the group, so the replicas split the work instead of each doing all of it;
- ``logs-response`` plainly: every replica sees every response and keeps the ones whose
  request id it asked for;
- and, for ``catch_up_s`` after each connect, the ingest channels plainly too, because a
  broker does not send retained messages to a shared subscription: that is how a hub (re)started
  learns the state devices reported while it was away. Duplicates this causes (and any QoS 1
  redelivery) are harmless: ingest decides in the database, under row locks, what is news.

With ``share_group`` None (a broker without shared subscriptions, such as RabbitMQ before
3.13) every replica subscribes plainly and the database alone keeps each message applied once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from pydantic import ValidationError

from cloud_hub.errors import GatewayTimeout
from manifests.compat import parse_lenient
from manifests.errors import FetchError
from manifests.logs import LogLimits, LogRequest, LogResponse, bound_response
from manifests.topics import INGEST_CHANNELS, LOGS_REQUEST, LOGS_RESPONSE, device_topic, parse_device_topic

log = logging.getLogger(__name__)
#: QoS 1 desired states :meth:`MqttLink.publish_states` keeps unacknowledged at once: a deploy
#: publishes one retained state per device, which should stream, not wait on round trips.
#: The link keeps this window itself and turns paho's own bound off (0): paho scans every
#: message it holds on each acknowledgement while under its bound, so a window of 1,000 cost
#: 1,000 steps per PUBACK (half the hub's CPU of a 5,000-device publish).
MAX_INFLIGHT = 1000

#: Called for every device message: ``(topic, payload, retained)``. Must not block.
MessageSink = Callable[[str, bytes, bool], None]


class MqttLink:
    """The hub's broker connection (built by :mod:`cloud_hub.wiring`)."""

    def __init__(
        self,
        *,
        host: str,
        port: int = 1883,
        prefix: str = "edgepack",
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        client_id: str | None = None,
        sink: MessageSink | None = None,
        publish_timeout_s: float = 10.0,
        connect_wait_s: float = 5.0,
        max_backoff_s: int = 30,
        share_group: str | None = None,
        catch_up_s: float = 5.0,
        on_connected: Callable[[], None] | None = None,
        log_limits: LogLimits | None = None,
    ) -> None:
        if publish_timeout_s <= 0 or connect_wait_s < 0:
            raise ValueError("publish_timeout_s must be > 0 and connect_wait_s >= 0")
        self.host = host
        self.port = port
        self.prefix = prefix
        self.publish_timeout_s = publish_timeout_s
        self.connect_wait_s = connect_wait_s
        self._sink = sink
        self.share_group = share_group
        self.catch_up_s = catch_up_s
        self.log_limits = log_limits or LogLimits()
        # Called from paho's network thread after every (re)subscription: it must only signal.
        # Public so that the composition root can point it at a part built after the link.
        self.on_connected = on_connected
        self._subscribed = threading.Event()
        self._started = False
        # Log requests waiting for their device's answer: request id -> (device id, answer, or
        # why the device's answer was refused).
        self._log_waiters: dict[str, tuple[str, queue.Queue[LogResponse | FetchError]]] = {}
        self._log_lock = threading.Lock()
        # A random suffix: two hub replicas with the same client id would kick each other off.
        cid = client_id or f"edgepack-hub-{secrets.token_hex(4)}"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls_ca is not None:
            self._client.tls_set(ca_certs=tls_ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self._client.reconnect_delay_set(min_delay=1, max_delay=max_backoff_s)
        self._client.max_inflight_messages_set(0)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; wait up to ``connect_wait_s`` for the subscriptions.

        A broker that is not up yet is not an error: paho keeps retrying with backoff.
        """
        if self._started:
            return
        self._started = True
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(self.connect_wait_s):
            log.warning(
                "MQTT broker %s:%s not reachable yet; retrying in the background", self.host, self.port
            )

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._client.is_connected() and self._subscribed.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and subscribed (within ``timeout`` seconds)."""
        return self._subscribed.wait(timeout)

    # --- publishing --------------------------------------------------------------------------

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        """Publish a signed desired state retained, QoS 1, and wait for the broker's PUBACK.

        Raises FetchError when the broker does not acknowledge in time; the state is still
        stored in the database, so the device gets it over HTTP, and paho delivers the queued
        message (in order) once it reconnects.
        """
        self._publish(device_topic(device_id, "desired", prefix=self.prefix), payload)

    def clear_desired(self, device_id: str) -> None:
        """Remove the retained desired state of ``device_id`` (an empty retained message)."""
        self._publish(device_topic(device_id, "desired", prefix=self.prefix), b"")

    def publish_states(self, states: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
        """Publish many devices' desired states (``None`` clears one), retained, QoS 1.

        Messages stream with up to :data:`MAX_INFLIGHT` unacknowledged (the oldest is awaited
        before one more is sent), so a thousand states cost about one round trip rather than a
        thousand. Returns, per device whose state the broker did not acknowledge within
        ``publish_timeout_s`` (of its send, or of the last acknowledgement), why; once one is
        not acknowledged the rest are not sent (the hub retries them later).
        """
        if not self._client.is_connected():
            why = (
                f"not connected to the broker {self.host}:{self.port}; check that it runs and the "
                "hub's credentials are in its password file"
            )
            return {device_id: why for device_id, _ in states}
        errors: dict[str, str] = {}
        window: deque[tuple[str, mqtt.MQTTMessageInfo]] = deque()
        stalled = False
        for device_id, payload in states:
            if len(window) >= MAX_INFLIGHT:
                stalled = not self._settle(*window.popleft(), errors)
            if stalled:
                errors[device_id] = (
                    f"publishing to {device_id}: not sent, the broker {self.host}:{self.port} stopped "
                    "acknowledging; the hub will deliver it when the broker answers"
                )
                continue
            topic = device_topic(device_id, "desired", prefix=self.prefix)
            window.append((device_id, self._client.publish(topic, payload or b"", qos=1, retain=True)))
        deadline = time.monotonic() + self.publish_timeout_s
        for device_id, info in window:
            self._settle(device_id, info, errors, timeout=max(0.0, deadline - time.monotonic()))
        return errors

    def _settle(
        self, device_id: str, info: mqtt.MQTTMessageInfo, errors: dict[str, str], timeout: float | None = None
    ) -> bool:
        """Wait for one publish's acknowledgement; note why in ``errors`` when none came."""
        try:
            info.wait_for_publish(self.publish_timeout_s if timeout is None else timeout)
        except (RuntimeError, ValueError) as exc:
            errors[device_id] = f"publishing to {device_id} via {self.host}:{self.port}: {exc}"
            return False
        if not info.is_published():
            errors[device_id] = (
                f"publishing to {device_id}: no acknowledgement within {self.publish_timeout_s:g}s; "
                "check the broker (the hub will deliver it when the broker answers)"
            )
            return False
        return True

    def request_logs(
        self, device_id: str, service: str, tail: int, timeout_s: float = 10.0, *, failed: bool = False
    ) -> LogResponse:
        """Ask a device for the last ``tail`` log lines of ``service`` (``failed``: of its last
        failed instance) and wait for its answer.

        Every hub replica subscribes to every device's ``logs-response`` without sharing, so
        the answer reaches the replica that asked, whichever that is; the request id matches.
        The device's answer is cut to ``tail`` lines and :attr:`log_limits`
        (:func:`manifests.logs.bound_response`): a device is not trusted to keep them.
        Raises :class:`GatewayTimeout` when the device does not answer in time, a
        :class:`FetchError` when its answer is too large or malformed.
        """
        request = LogRequest(request_id=secrets.token_hex(16), service=service, tail=tail, failed=failed)
        answer: queue.Queue[LogResponse | FetchError] = queue.Queue(maxsize=1)
        with self._log_lock:
            self._log_waiters[request.request_id] = (device_id, answer)
        try:
            self._publish(
                device_topic(device_id, LOGS_REQUEST, prefix=self.prefix),
                request.payload(),
                retain=False,
            )
            got = answer.get(timeout=timeout_s)
        except queue.Empty:
            raise GatewayTimeout(
                f"device {device_id!r} did not answer the log request within {timeout_s:g}s; "
                "check that it is online and its agent runs ('edgepack device show')"
            ) from None
        finally:
            with self._log_lock:
                self._log_waiters.pop(request.request_id, None)
        if isinstance(got, FetchError):
            raise got
        return bound_response(got, tail=tail, limits=self.log_limits)

    def _on_log_response(self, topic: str, payload: bytes) -> None:
        parsed = parse_device_topic(topic, prefix=self.prefix)
        if parsed is None:
            return
        device_id = parsed[0]
        with self._log_lock:
            asked = any(waiting == device_id for waiting, _ in self._log_waiters.values())
        if not asked:
            return  # unasked answers cost nothing: not even parsed (this runs in paho's thread)
        limit = self.log_limits.payload_bytes
        if len(payload) > limit:
            # Not parsed at all: its request id is unknown, so every request waiting on this
            # device (only it can write this topic) learns why no answer comes.
            log.warning("log response of %d bytes on %s refused (limit %d)", len(payload), topic, limit)
            self._refuse_answers(
                device_id,
                f"device {device_id!r} answered the log request with {len(payload):,} bytes, more "
                f"than the hub accepts ({limit:,}, EDGEPACK_HUB_LOG_PAYLOAD_MAX_BYTES); "
                "ask for fewer lines (--tail)",
            )
            return
        try:
            response = parse_lenient(LogResponse, payload)
        except ValidationError as exc:
            log.warning("malformed log response on %s", topic)
            self._refuse_answers(
                device_id,
                f"device {device_id!r} answered the log request with a malformed message "
                f"({exc.error_count()} error(s), first at {'.'.join(map(str, exc.errors()[0]['loc']))}); "
                "check its agent's version and log",
            )
            return
        with self._log_lock:
            waiter = self._log_waiters.get(response.request_id)
        # Only the device asked may answer, on its own topic.
        if waiter is None or waiter[0] != parsed[0] or response.device_id != parsed[0]:
            return
        with contextlib.suppress(queue.Full):
            waiter[1].put_nowait(response)

    def _refuse_answers(self, device_id: str, message: str) -> None:
        with self._log_lock:
            waiting = [answer for asked, answer in self._log_waiters.values() if asked == device_id]
        for answer in waiting:
            with contextlib.suppress(queue.Full):
                answer.put_nowait(FetchError(message))

    def _publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        what = f"publishing to {topic} via {self.host}:{self.port}"
        if not self._client.is_connected():
            raise FetchError(
                f"{what}: not connected to the broker; check that it runs and the hub's "
                "credentials are in its password file"
            )
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(self.publish_timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise FetchError(f"{what}: {exc}; check the broker and retry") from exc
        if not info.is_published():
            raise FetchError(
                f"{what}: no acknowledgement within {self.publish_timeout_s:g}s; "
                "check the broker (the hub will deliver it when the broker answers)"
            )

    # --- paho callbacks (network thread) ---------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker refused the hub: %s", reason)
            return
        plain = [f"{self.prefix}/devices/+/{channel}" for channel in INGEST_CHANNELS]
        topics = [(f"{self.prefix}/devices/+/{LOGS_RESPONSE}", 1), *((t, 1) for t in plain)]
        if self.share_group is not None:
            topics += [(f"$share/{self.share_group}/{t}", 1) for t in plain]
        rc, _mid = client.subscribe(topics)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("MQTT subscribe failed: %s", mqtt.error_string(rc))
            return
        if self.share_group is not None:
            # The plain ingest subscriptions only bring the retained messages; then the shared
            # ones carry the traffic. (A timer thread: the network thread must not wait.)
            timer = threading.Timer(self.catch_up_s, self._end_catch_up, args=(plain,))
            timer.daemon = True
            timer.start()

    def _end_catch_up(self, topics: list[str]) -> None:
        if self._client.is_connected():
            self._client.unsubscribe(topics)

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: list[Any], _props: Any
    ) -> None:
        refused = [r for r in reasons if r.is_failure]
        if refused:
            log.warning("MQTT broker refused the hub's subscriptions: %s", refused)
            return
        self._subscribed.set()
        if self.on_connected is not None:
            self.on_connected()

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._subscribed.clear()
        if self._started:
            log.info("MQTT connection lost (%s); reconnecting with backoff", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/" + LOGS_RESPONSE):
            self._on_log_response(msg.topic, bytes(msg.payload))
            return
        if self._sink is None:
            return
        try:
            self._sink(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:
            # Nothing a device sends may kill the network thread.
            log.exception("ingest refused a message on %s", msg.topic)
