"""Per-device budgets for what devices send: messages per channel, and events they cause.

A device is not trusted to be well-behaved: a buggy or hostile agent that publishes its
reported state in a loop, or a hundred modules flipping between states, must not fill the
event log or starve the other devices of ingest. Each device gets a token bucket per channel
(``reported``, ``telemetry``) and one for the events its reports cause; what is over budget is
dropped and counted, and the worker records one event a minute per device saying so.

Pure apart from the clock, which the caller passes in, so the tests need no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Buckets of this many devices at most; past it the oldest half is forgotten (a broker
#: without the hub's ACL could let a client invent device ids without end).
MAX_TRACKED_DEVICES = 100_000


@dataclass(frozen=True)
class IngestLimits:
    """How much each device may send. ``per_min`` is the sustained rate, ``burst`` the bucket."""

    reports_per_min: float = 120.0
    reports_burst: int = 30
    telemetry_per_min: float = 120.0
    telemetry_burst: int = 30
    events_per_min: float = 120.0
    events_burst: int = 200

    def __post_init__(self) -> None:
        for name in ("reports", "telemetry", "events"):
            if getattr(self, f"{name}_per_min") <= 0 or getattr(self, f"{name}_burst") < 1:
                raise ValueError(f"{name} budget must be positive")


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class TokenBuckets:
    """One token bucket per key, refilled at ``per_min`` tokens a minute up to ``burst``."""

    per_min: float
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str, now: float) -> bool:
        """Spend one token of ``key``; False (nothing spent) when its bucket is empty."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_DEVICES:
                for old in list(self._buckets)[: MAX_TRACKED_DEVICES // 2]:
                    del self._buckets[old]
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.per_min / 60)
            bucket.at = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True


class DeviceBudget:
    """The buckets of every device, per channel and for events; counts what it refused."""

    def __init__(self, limits: IngestLimits) -> None:
        self.limits = limits
        self._channels = {
            "reported": TokenBuckets(limits.reports_per_min, limits.reports_burst),
            "telemetry": TokenBuckets(limits.telemetry_per_min, limits.telemetry_burst),
        }
        self._events = TokenBuckets(limits.events_per_min, limits.events_burst)
        #: device id → messages or events refused since the last report of it (for the events)
        self.refused: dict[str, int] = {}

    def allow_message(self, device_id: str, channel: str, now: float) -> bool:
        buckets = self._channels.get(channel)
        if buckets is None or buckets.take(device_id, now):
            return True
        self._count(device_id)
        return False

    def allow_event(self, device_id: str, now: float) -> bool:
        if self._events.take(device_id, now):
            return True
        self._count(device_id)
        return False

    def _count(self, device_id: str) -> None:
        if device_id in self.refused or len(self.refused) < MAX_TRACKED_DEVICES:
            self.refused[device_id] = self.refused.get(device_id, 0) + 1

    def take_refused(self) -> dict[str, int]:
        """What was refused since the last call, by device (and forget it)."""
        out, self.refused = self.refused, {}
        return out
