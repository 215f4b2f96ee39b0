"""What one device may upload: bytes per hour, a token bucket per device (per hub process).

A batch is charged before its body is read, by its declared length but at least
:data:`MIN_CHARGE`, so that a device cannot flood the hub, its store or the event log (one
``data.batch-received`` event per batch) with many small batches either. Pure apart from the
clock, which the caller passes in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The least a batch costs: at the default 64 MiB an hour, at most 1024 batches an hour.
MIN_CHARGE = 64 << 10
#: Devices tracked at most; past it the oldest half is forgotten (bounded memory).
MAX_TRACKED_DEVICES = 100_000


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class DataBudget:
    """``bytes_per_hour`` sustained, ``burst`` at once, per device."""

    bytes_per_hour: float
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bytes_per_hour <= 0 or self.burst < MIN_CHARGE:
            raise ValueError("data budget must be positive and hold at least one batch")

    def take(self, device_id: str, size: int, now: float) -> float | None:
        """Charge ``size`` bytes (at least MIN_CHARGE) to the device: None when it may send
        them, else the seconds after which it may (nothing is charged then)."""
        cost = min(float(self.burst), float(max(size, MIN_CHARGE)))
        bucket = self._buckets.get(device_id)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_DEVICES:
                for old in list(self._buckets)[: MAX_TRACKED_DEVICES // 2]:
                    del self._buckets[old]
            bucket = self._buckets[device_id] = _Bucket(float(self.burst), now)
        else:
            rate = self.bytes_per_hour / 3600
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
        if bucket.tokens < cost:
            return (cost - bucket.tokens) / (self.bytes_per_hour / 3600)
        bucket.tokens -= cost
        return None
