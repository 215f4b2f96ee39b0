"""What one connected device costs the broker: Mosquitto's memory per device session.

A real Mosquitto (the tests' helper, anonymous, no persistence file) and ``--devices`` raw MQTT
3.1.1 connections as the agent makes them (client id = device id, ``clean_session=False``,
keepalive 30 s), each subscribed at QoS 1 to its own ``desired`` and ``logs-request`` topics.
Then every device's retained messages are published as the fleet holds them: a signed
one-service desired state (made by ``bench/ingest.py``'s helper with a real Ed25519 key), a
reported state and ``online``. Mosquitto's resident memory (``VmRSS``) is read with no client,
after the sessions and after the retained messages.

``kb_per_session`` and ``kb_per_device`` (sessions plus retained messages) are the figures
docs/scale-out.md multiplies for a million devices.

Usage: ``python bench/broker_memory.py [--quick] [--devices N]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

# The benchmarks start the same engines as the tests, with the tests' helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ingest import assigning_svc, reported

from tests.hub.broker_fixtures import start_mosquitto

PREFIX = "edgepack"


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str) -> bytes:
    # MQTT 3.1.1, clean session off (the agent's persistent session), keepalive 30 s
    body = _str("MQTT") + bytes([4, 0x00]) + struct.pack("!H", 30) + _str(client_id)
    return b"\x10" + _length(len(body)) + body


def subscribe_packet(packet_id: int, topics: list[str]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_str(t) + b"\x01" for t in topics)
    return b"\x82" + _length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    body = _str(topic) + payload  # QoS 0, retained
    return b"\x31" + _length(len(body)) + body


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def drain(socks: list[socket.socket], settle_s: float) -> None:
    """Read whatever the broker sent (acks, retained messages) until it is quiet for a while,
    so that nothing waits in its output buffers when memory is read."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle_s:
        events = sel.select(timeout=0.1)
        for key, _ in events:
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if not sock.recv(1 << 16):
                raise SystemExit("the broker closed a device connection")
        if events:
            quiet_since = time.monotonic()
    sel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 devices (default 15,000)")
    parser.add_argument("--devices", type=int, default=None)
    args = parser.parse_args()
    devices = args.devices or (5_000 if args.quick else 15_000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if devices + 256 > hard:
        raise SystemExit(f"{devices} devices need {devices + 256} open files; this shell allows {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, devices + 1024)), hard))

    def config(port: int) -> str:
        return (f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_connections -1\n")  # fmt: skip

    workdir = Path(tempfile.mkdtemp(prefix="edgepack-bench-broker-"))
    broker = start_mosquitto(workdir, config)
    pid = broker.process.pid
    socks: list[socket.socket] = []
    try:
        time.sleep(0.5)
        empty_kb = rss_kb(pid)
        ids = [f"dev-{i:07d}" for i in range(devices)]
        start = time.perf_counter()
        for i, device in enumerate(ids):
            s = socket.create_connection((broker.host, broker.port))
            topics = [f"{PREFIX}/devices/{device}/desired", f"{PREFIX}/devices/{device}/logs-request"]
            s.sendall(connect_packet(device) + subscribe_packet(i % 65535 + 1, topics))
            socks.append(s)
        connect_s = time.perf_counter() - start
        drain(socks, 1.0)
        sessions_kb = rss_kb(pid)

        key = Ed25519PrivateKey.generate()
        hub = type("Hub", (), {"hub_key": key})
        pub = socket.create_connection((broker.host, broker.port))
        pub.sendall(connect_packet("bench-hub-publisher"))
        sizes = {"desired": 0, "reported": 0}
        batch = bytearray()
        for device in ids:
            desired, report = assigning_svc(hub, device), reported(device, 1)  # type: ignore[arg-type]
            sizes = {"desired": len(desired), "reported": len(report)}
            batch += publish_packet(f"{PREFIX}/devices/{device}/desired", desired)
            batch += publish_packet(f"{PREFIX}/devices/{device}/reported", report)
            batch += publish_packet(f"{PREFIX}/devices/{device}/online", b"true")
            if len(batch) > 1 << 20:
                pub.sendall(batch)
                batch.clear()
        pub.sendall(batch)
        drain([*socks, pub], 2.0)
        retained_kb = rss_kb(pid)
    finally:
        for s in socks:
            s.close()
        broker.process.terminate()
        broker.process.wait(10)
    result = {
        "bench": "broker-memory",
        "devices": devices,
        "connect_s": round(connect_s, 2),
        "empty_mb": round(empty_kb / 1024, 1),
        "sessions_mb": round(sessions_kb / 1024, 1),
        "with_retained_mb": round(retained_kb / 1024, 1),
        "kb_per_session": round((sessions_kb - empty_kb) / devices, 2),
        "kb_per_device": round((retained_kb - empty_kb) / devices, 2),
        "desired_bytes": sizes["desired"],
        "reported_bytes": sizes["reported"],
    }
    for k, v in result.items():
        print(f"{k:>18}: {v}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
