"""Simulated devices for ``bench/fleet.py``: a few thousand lightweight agents in one process.

Each device is a real MQTT client (paho) logged in with its own broker account (its id as user
name and client id, as the agent connects), subscribed to its own ``desired`` topic, with its
own HTTP token. On a desired state it does what the agent does before it would run anything,
with the agent's contract functions:

1. ``manifests.desired.verify_desired`` on the raw bytes (hub signature, device id, newer
   generation, expiry);
2. ``GET /api/v1/device/manifests/<digest>`` with its token; the bytes must hash to the digest
   the signed state names, then ``manifests.verified.parse_module_manifest`` against the
   device's own publisher keys;
3. ``GET /api/v1/device/blobs/<digest>`` for every blob this device does not hold yet, each
   checked against its sha256. Every device downloads for itself (each download is counted);
   only then may the bytes land in the one on-disk cache this process keeps;
4. reports ``Transitioning`` when it starts and ``Healthy`` once it has everything, without
   running a model.

No thread per client: every client of the process is driven by one loop over a selector
(paho's ``loop_read``/``loop_write``/``loop_misc``), and downloads run on a small thread pool
sharing one ``httpx`` connection pool. The parent talks to the process over a pipe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import resource
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from manifests.desired import DesiredState, ModuleAssignment, verify_desired
from manifests.device import DeviceCredentials
from manifests.digests import sha256_digest
from manifests.errors import EdgepackError
from manifests.reported import ModuleMetrics, ModuleStatus, ReportedState, Telemetry
from manifests.signing import TrustStore
from manifests.states import ServiceState
from manifests.topics import device_topic
from manifests.verified import parse_module_manifest

AGENT_VERSION = "fleet-sim"
DOWNLOAD_THREADS = 6


@dataclass
class Counters:
    """Work done since the parent last asked, and when (wall clock) devices reached a point."""

    verify_s: float = 0.0  # desired-state checks
    manifest_verify_s: float = 0.0  # manifest digest + publisher signature checks
    download_s: float = 0.0  # HTTP time of manifests and blobs
    report_s: float = 0.0  # building and queueing reported states
    desired_at: list[float] = field(default_factory=list)
    healthy_at: list[float] = field(default_factory=list)
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0
    refused: int = 0
    failed: int = 0
    reports: int = 0
    errors: list[str] = field(default_factory=list)

    def take(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["errors"] = out["errors"][:5]
        self.__init__()  # type: ignore[misc]
        return out


@dataclass(eq=False)  # by identity: devices go in sets
class SimDevice:
    credentials: DeviceCredentials
    hub_trust: TrustStore
    client: mqtt.Client
    applied_generation: int = 0
    wanted: ModuleAssignment | None = None
    serving: ModuleAssignment | None = None
    state: ServiceState | None = None
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    reason: str | None = None
    connected: bool = False
    holds: set[str] = field(default_factory=set)  # blobs this device downloaded (its own cache)
    ever: set[str] = field(default_factory=set)  # every manifest digest it served
    requests: int = 0  # its serving instance's counters (a new instance starts them again)
    errors: int = 0
    next_sample: float = 0.0  # monotonic time of its next telemetry sample

    @property
    def device_id(self) -> str:
        return self.credentials.device_id

    def topic(self, channel: str) -> str:
        return device_topic(self.device_id, channel, prefix=self.credentials.mqtt.topic_prefix)


class Shard:
    """The devices of one simulator process and the loop that drives them."""

    def __init__(self, documents: list[dict[str, Any]], cache_dir: Path, control: Connection) -> None:
        self.control = control
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.selector = selectors.DefaultSelector()
        self.counters = Counters()
        self.lock = threading.Lock()
        self.done: queue.Queue[tuple[SimDevice, ModuleAssignment, str | None]] = queue.Queue()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.selector.register(control.fileno(), selectors.EVENT_READ, "control")
        self.pool = ThreadPoolExecutor(DOWNLOAD_THREADS)
        limits = httpx.Limits(max_connections=DOWNLOAD_THREADS, max_keepalive_connections=DOWNLOAD_THREADS)
        self.http = httpx.Client(timeout=120, limits=limits)  # one pool for every device here
        self.dirty: set[SimDevice] = set()  # clients with something to write
        self.devices = [self._device(DeviceCredentials.model_validate(d)) for d in documents]
        self.running = True
        #: telemetry: seconds between a device's samples (0: none), and per manifest digest
        #: what its version does: (share of requests that fail, p95 latency in ms)
        self.telemetry_s = 0.0
        self.behaviour: dict[str, tuple[float, float]] = {}

    # --- MQTT ---------------------------------------------------------------------------------

    def _device(self, credentials: DeviceCredentials) -> SimDevice:
        account = credentials.mqtt
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=account.username, protocol=mqtt.MQTTv311)
        client.username_pw_set(account.username, account.password)
        client.max_inflight_messages_set(0)  # no cap: a report burst goes out at once
        device = SimDevice(credentials, credentials.hub_trust(), client)
        client.will_set(device.topic("online"), b"false", qos=1, retain=True)
        client.on_connect = lambda _c, _u, _f, reason, _p: self._on_connect(device, reason)
        client.on_disconnect = lambda *_a: setattr(device, "connected", False)
        client.on_message = lambda _c, _u, msg: self._on_desired(device, bytes(msg.payload))
        return device

    def connect_all(self) -> None:
        for device in self.devices:
            account = device.credentials.mqtt
            device.client.connect(account.host or "127.0.0.1", account.port, keepalive=600)
            sock = device.client.socket()
            assert sock is not None
            self.selector.register(sock, selectors.EVENT_READ, device)
            self.dirty.add(device)
            self._pump(0)

    def _on_connect(self, device: SimDevice, reason: Any) -> None:
        if reason.is_failure:
            self.counters.errors.append(f"{device.device_id}: broker refused: {reason}")
            return
        device.connected = True
        device.client.subscribe(device.topic("desired"), qos=1)
        device.client.publish(device.topic("online"), b"true", qos=1, retain=True)
        self.dirty.add(device)

    def _pump(self, timeout: float) -> None:
        for key, _events in self.selector.select(timeout):
            if key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    self.wake_r.recv(65536)
            elif key.data == "control":
                self._on_control(self.control.recv())
            else:
                device = key.data
                if device.client.loop_read(100) != mqtt.MQTT_ERR_SUCCESS:
                    self._drop(device)
                    continue
                self.dirty.add(device)  # acknowledgements to send
        while True:
            try:
                device, assignment, error = self.done.get_nowait()
            except queue.Empty:
                break
            self._fetched(device, assignment, error)
        for device in list(self.dirty):
            if device.client.want_write():
                device.client.loop_write()
            if not device.client.want_write():
                self.dirty.discard(device)

    def _drop(self, device: SimDevice) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(device.client.socket() or -1)
        device.connected = False
        self.dirty.discard(device)
        self.counters.errors.append(f"{device.device_id}: lost the broker connection")

    def run(self) -> None:
        last_misc = time.monotonic()
        while self.running:
            self._pump(0.05)
            if self.telemetry_s > 0:
                self._sample(time.monotonic())
            if time.monotonic() - last_misc > 10:
                last_misc = time.monotonic()
                for device in self.devices:
                    if device.connected:
                        device.client.loop_misc()  # keepalive pings
                        self.dirty.add(device)
        for device in self.devices:
            with contextlib.suppress(Exception):
                device.client.disconnect()
                device.client.loop_write()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- the parent's requests ----------------------------------------------------------------

    def _on_control(self, message: tuple[str, Any]) -> None:
        kind, _arg = message
        if kind == "connected":
            self.control.send(sum(d.connected for d in self.devices))
        elif kind == "counters":
            self.control.send(self.counters.take())
        elif kind == "report-all":
            # One full report from every device at once, as after a broker restart.
            for device in self.devices:
                self._report(device)
            self.control.send(len(self.devices))
        elif kind == "stop":
            self.running = False
            self.control.send(True)
        elif kind == "telemetry":
            # Every device samples every ``interval`` seconds, spread evenly over the interval.
            self.telemetry_s = float(_arg)
            now = time.monotonic()
            for i, device in enumerate(self.devices):
                device.next_sample = now + self.telemetry_s * i / max(1, len(self.devices))
            self.control.send(True)
        elif kind == "behave":
            self.behaviour = {digest: (float(e), float(p)) for digest, (e, p) in _arg.items()}
            self.control.send(True)
        elif kind == "ever":
            self.control.send(sum(1 for d in self.devices if _arg in d.ever))
        elif kind == "serving":
            self.control.send(
                sum(1 for d in self.devices if d.serving is not None and d.serving.manifest_digest == _arg)
            )

    # --- desired state, downloads, reports ----------------------------------------------------

    def _on_desired(self, device: SimDevice, payload: bytes) -> None:
        if not payload:
            return
        self.counters.desired_at.append(time.time())
        start = time.perf_counter()
        try:
            state = verify_desired(
                payload,
                hub_trust=device.hub_trust,
                device_id=device.device_id,
                applied_generation=device.applied_generation,
                now=datetime.now(UTC),
            )
        except EdgepackError:
            self.counters.refused += 1  # e.g. a retained state seen again: not newer
            return
        finally:
            self.counters.verify_s += time.perf_counter() - start
        device.applied_generation = state.generation
        self._apply(device, state)

    def _apply(self, device: SimDevice, state: DesiredState) -> None:
        wanted = state.modules[0] if state.modules else None
        device.wanted = wanted
        if wanted is None:
            device.serving, device.state = None, None
            self._report(device)
        elif device.serving is not None and device.serving.manifest_digest == wanted.manifest_digest:
            self._set_state(device, ServiceState.HEALTHY)
        else:
            self._set_state(device, ServiceState.TRANSITIONING)
            self.pool.submit(self._fetch, device, wanted)

    def _fetch(self, device: SimDevice, wanted: ModuleAssignment) -> None:
        error = None
        try:
            self._download(device, wanted)
        except Exception as exc:  # reported as the device's Failed reason
            error = f"{type(exc).__name__}: {exc}"[:400]
        self.done.put((device, wanted, error))
        self.wake_w.send(b"x")

    def _download(self, device: SimDevice, wanted: ModuleAssignment) -> None:
        creds = device.credentials
        headers = {"Authorization": f"Bearer {creds.token}"}
        start = time.perf_counter()
        r = self.http.get(
            f"{creds.hub_url}/api/v1/device/manifests/{wanted.manifest_digest}", headers=headers
        )
        r.raise_for_status()
        data = r.content
        checked = time.perf_counter()
        if sha256_digest(data) != wanted.manifest_digest:
            raise EdgepackError("the manifest does not hash to the digest the hub signed")
        verified = parse_module_manifest(data, creds.publishers, what=f"module {wanted.module}")
        verify_s = time.perf_counter() - checked
        fetched, blobs = len(data), 0
        for digest in sorted(set(verified.blob_sizes) - device.holds):
            r = self.http.get(f"{creds.hub_url}/api/v1/device/blobs/{digest}", headers=headers)
            r.raise_for_status()
            body = r.content
            if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                raise EdgepackError(f"blob {digest} does not match its digest")
            blobs += 1
            fetched += len(body)
            self._keep(digest, body)  # counted for this device above; now it may be shared
            device.holds.add(digest)
        with self.lock:
            self.counters.manifests += 1
            self.counters.blobs += blobs
            self.counters.bytes += fetched
            self.counters.manifest_verify_s += verify_s
            self.counters.download_s += time.perf_counter() - start - verify_s

    def _keep(self, digest: str, body: bytes) -> None:
        path = self.cache_dir / digest.removeprefix("sha256:")
        if path.exists():
            return
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
        tmp.write_bytes(body)
        os.replace(tmp, path)

    def _fetched(self, device: SimDevice, wanted: ModuleAssignment, error: str | None) -> None:
        if device.wanted is None or device.wanted.manifest_digest != wanted.manifest_digest:
            return  # the desired state moved on during the download
        if error is not None:
            self.counters.failed += 1
            self.counters.errors.append(f"{device.device_id}: {error}")
            self._set_state(device, ServiceState.FAILED, error)
            return
        device.serving = wanted
        device.ever.add(wanted.manifest_digest)
        device.requests = device.errors = 0  # a new instance: its counters start again
        self._set_state(device, ServiceState.HEALTHY)
        self.counters.healthy_at.append(time.time())

    def _set_state(self, device: SimDevice, state: ServiceState, reason: str | None = None) -> None:
        device.state, device.since, device.reason = state, datetime.now(UTC), reason
        self._report(device)

    def _sample(self, now: float) -> None:
        """A telemetry sample from every device whose time has come (QoS 0, as the agent)."""
        for device in self.devices:
            if device.next_sample > now:
                continue
            device.next_sample = now + self.telemetry_s
            serving = device.serving
            if not device.connected or serving is None or device.state is not ServiceState.HEALTHY:
                continue
            how = self.behaviour.get(serving.manifest_digest, (0.0, 10.0))
            payload = _telemetry_of(device, serving, self.telemetry_s, how)
            device.client.publish(device.topic("telemetry"), payload, qos=0)
            self.dirty.add(device)

    def _report(self, device: SimDevice) -> None:
        start = time.perf_counter()
        modules = []
        wanted, serving = device.wanted, device.serving
        if wanted is not None and device.state is not None:
            modules.append(
                ModuleStatus(
                    service=wanted.service,
                    manifest_digest=wanted.manifest_digest,
                    version=wanted.version,
                    generation=device.applied_generation,
                    state=device.state,
                    reason=device.reason,
                    since=device.since,
                    runtime="process",
                    port=wanted.settings.port,
                    serving_digest=serving.manifest_digest if serving else None,
                    serving_version=serving.version if serving else None,
                )
            )
        report = ReportedState(
            device_id=device.device_id,
            reported_at=datetime.now(UTC),
            agent_version=AGENT_VERSION,
            applied_generation=device.applied_generation,
            runtimes=["process"],
            modules=modules,
        )
        payload = report.model_dump_json(by_alias=True, exclude_none=True).encode()
        device.client.publish(device.topic("reported"), payload, qos=1, retain=True)
        self.dirty.add(device)
        self.counters.reports += 1
        self.counters.report_s += time.perf_counter() - start


#: Requests each simulated device serves per second.
REQUESTS_PER_S = 20


def _telemetry_of(
    device: SimDevice, serving: ModuleAssignment, interval_s: float, how: tuple[float, float]
) -> bytes:
    error_share, p95_ms = how
    served = round(REQUESTS_PER_S * interval_s)
    device.requests += served
    device.errors += round(served * error_share)
    sample = Telemetry(
        device_id=device.device_id,
        ts=datetime.now(UTC),
        modules=[
            ModuleMetrics(
                service=serving.service, requests_total=device.requests, errors_total=device.errors,
                requests_per_s=REQUESTS_PER_S, p50_ms=p95_ms / 2, p95_ms=p95_ms,
            )
        ],
    )  # fmt: skip
    return sample.model_dump_json(by_alias=True, exclude_none=True).encode()


def run_shard(credentials_file: str, cache_dir: str, control: Connection) -> None:
    """One simulator process: connect every device in the file, then serve until told to stop."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per device
    documents = json.loads(Path(credentials_file).read_text())
    shard = Shard(documents, Path(cache_dir), control)
    shard.connect_all()
    control.send("ready")
    shard.run()
