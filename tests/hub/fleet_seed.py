"""A fleet of thousands of devices in a real hub, seeded in seconds through the hub's own code.

Devices are enrolled with ``fleet.devices.enroll_device`` inside one fleet change (one
transaction, one desired state signed per device, as ``edgepack device enroll`` does one at a
time). Their online flags and reported states go through the hub's ingest worker
(``IngestWorker.submit``: the very call the MQTT thread makes for each message), so they are
parsed, checked against each device's desired state and stored exactly as live ones are.

The mix is deterministic (device ``i``'s tags, online flag and state follow from ``i``), so a
test can say what to expect; the counts a test asserts are still read back from the database.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from cloud_hub.fleet.devices import enroll_device
from tests.hub.conftest import RunningHub

SITES = ("berlin", "paris", "tokyo", "austin", "lagos")

#: State of every service a reporting device runs, by ``i % 20``; None: it has not reported.
STATE_CYCLE: tuple[str | None, ...] = (
    *("Healthy",) * 13,
    "Transitioning",
    "Transitioning",
    "Failed",
    "Unhealthy",
    "Unschedulable",
    None,
    None,
)


def device_id(i: int) -> str:
    return f"sim-{i:05d}"


def tags_of(i: int) -> dict[str, str]:
    return {
        "fleet": "sim",
        "site": SITES[i % len(SITES)],
        "tier": "gpu" if i % 7 == 0 else "cpu",
        "ring": "canary" if i % 50 == 0 else "stable",
    }


def online_of(i: int) -> bool:
    return i % 10 < 8  # 80 % online


def state_of(i: int) -> str | None:
    return STATE_CYCLE[i % len(STATE_CYCLE)]


@dataclass(frozen=True)
class SeededFleet:
    count: int
    services: dict[str, str]  # service → manifest digest


def enroll_many(hub: RunningHub, count: int) -> list[str]:
    """Enroll ``count`` devices in one fleet change (one transaction)."""
    ids = [device_id(i) for i in range(count)]

    def mutate(session: Session) -> None:
        # No flush per device (enroll_device looks the id up first, which would flush every
        # pending row): the rows go to the database in one batched flush at the end.
        with session.no_autoflush:
            for i, dev in enumerate(ids):
                enroll_device(session, dev, tags_of(i))

    hub.process.fleet.change(mutate)
    return ids


def reported_payload(dev: str, modules: Sequence[tuple[str, str, str]], at: datetime) -> bytes:
    """A reported state: ``modules`` holds (service, manifest digest, state)."""
    return json.dumps(
        {
            "device_id": dev,
            "reported_at": at.isoformat(),
            "agent_version": "0.1.0",
            "applied_generation": 1,
            "modules": [
                {
                    "service": svc,
                    "manifest_digest": digest,
                    "state": state,
                    "since": at.isoformat(),
                    **({"reason": f"{svc}: simulated {state.lower()}"} if state != "Healthy" else {}),
                }
                for svc, digest, state in modules
            ],
        }
    ).encode()


def ingest_mix(
    hub: RunningHub, count: int, services_of: dict[str, list[str]], digests: dict[str, str]
) -> None:
    """Submit every device's online flag and (for most) a reported state to the ingest worker,
    and wait until it has applied them all."""
    worker = hub.process.ingest
    assert worker is not None, "the hub needs a broker (mqtt_host) for ingest"
    prefix = hub.core.settings.topic_prefix
    now = datetime.now(UTC)
    for i in range(count):
        dev = device_id(i)
        topic = f"{prefix}/devices/{dev}"
        worker.submit(f"{topic}/online", b"true" if online_of(i) else b"false", retained=False)
        state = state_of(i)
        if state is not None and services_of.get(dev):
            modules = [(svc, digests[svc], state) for svc in services_of[dev]]
            worker.submit(f"{topic}/reported", reported_payload(dev, modules, now), retained=False)
    assert worker.drain(timeout=60), "ingest did not catch up with the seeded fleet"
    assert worker.stats.failed == 0 and worker.stats.rejected == 0, worker.stats
