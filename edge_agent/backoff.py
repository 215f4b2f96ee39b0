"""Retry delays (pure; the caller passes the random number).

Two kinds, for two situations:

- :func:`full_jitter`: reconnecting to the broker or the hub. A whole fleet reconnects after a
  broker restart; sleeping a uniformly random time up to the capped exponential (AWS's "full
  jitter") spreads the devices out instead of sending them back in lockstep.
- :class:`RestartBackoff`: restarting a module that crashed or stopped answering its probe:
  1 s doubling to 300 s, +-20 % jitter, forgiven after 10 minutes of good health.
"""

from __future__ import annotations

from dataclasses import dataclass


def full_jitter(attempt: int, rand: float, *, base_s: float = 1.0, cap_s: float = 60.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry); ``rand`` is
    uniform in [0, 1)."""
    if attempt < 0 or not 0.0 <= rand < 1.0:
        raise ValueError("attempt must be >= 0 and rand in [0, 1)")
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt, 62))
    return ceiling * rand


@dataclass(frozen=True)
class RestartBackoff:
    base_s: float = 1.0
    cap_s: float = 300.0
    jitter: float = 0.2
    reset_after_s: float = 600.0

    def delay(self, failures: int, rand: float) -> float:
        """Seconds before restart after ``failures`` consecutive failures (1 for the first);
        ``rand`` uniform in [0, 1) picks the jitter."""
        if failures < 1 or not 0.0 <= rand < 1.0:
            raise ValueError("failures must be >= 1 and rand in [0, 1)")
        nominal = min(self.cap_s, self.base_s * 2.0 ** min(failures - 1, 62))
        return nominal * (1.0 + self.jitter * (2.0 * rand - 1.0))

    def forgiven(self, healthy_for_s: float) -> bool:
        """True when a module has been healthy long enough to start counting failures anew."""
        return healthy_for_s >= self.reset_after_s
