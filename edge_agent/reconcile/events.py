"""What reaches the reconcile loop's queue: the events the executor feeds back (an operation
ended or moved on, a poll answered, an instance retired), the broker's, the prober's, and
:class:`Stop`. Plain data, shared by the executor, the loop and the pure step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_agent.health import ProbeResult
from edge_agent.uplink.http import DesiredFetch
from edge_agent.uplink.mqtt import MqttEvent
from manifests.errors import EdgepackError
from manifests.reported import Progress


@dataclass(frozen=True)
class OpDone:
    service: str
    op_id: int
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class OpProgress:
    service: str
    op_id: int
    progress: Progress


@dataclass(frozen=True)
class HttpDesired:
    fetch: DesiredFetch | None
    error: EdgepackError | None = None


@dataclass(frozen=True)
class Retired:
    instance_id: str


@dataclass(frozen=True)
class Stop:
    pass


Event = MqttEvent | OpDone | OpProgress | HttpDesired | ProbeResult | Retired | Stop
