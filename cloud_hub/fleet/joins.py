"""Joins enrolled in batches: one fleet change and one broker reload for many devices.

A fleet change takes the fleet lock, reads the plan and rewrites the broker's accounts; one per
join would make 5,000 joins cost 5,000 account rewrites of a growing file. Joins arriving
together are therefore committed together (a group commit): the first caller to find no batch
running takes every waiting join (up to ``max_batch``) and runs them as one change, while the
others wait for their answer. Each join is still judged alone (:func:`join_devices`); a batch
that fails as a whole (e.g. a port clash the tags of one device cause) is retried one by one,
so one bad join never refuses another.

Joins are rate-bounded per hub process (a token bucket): a flood of join attempts, valid or
not, costs at most that many signature checks and database visits a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.errors import Throttled
from cloud_hub.fleet.changes import FleetChanges
from cloud_hub.fleet.provisioning import Join, join_devices, record_refusal
from manifests.errors import EdgepackError


class TokenBucket:
    """``rate_per_s`` on average, up to ``burst`` at once; thread-safe, injectable clock."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._tokens = burst
        self._clock = clock
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> float | None:
        """None when one may go now (and it is spent); else the seconds until one may."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return None
            return (1 - self._tokens) / self._rate


@dataclass
class _Slot:
    join: Join
    done: bool = False
    error: BaseException | None = None


class JoinQueue:
    def __init__(
        self, fleet: FleetChanges, sessions: Sessions, *, reserved: str | None, max_batch: int,
        rate_per_s: float, burst: float,
    ) -> None:  # fmt: skip
        self._fleet = fleet
        self._sessions = sessions
        self._reserved = reserved
        self._max_batch = max_batch
        self._bucket = TokenBucket(rate_per_s, burst)
        self._cond = threading.Condition()
        self._pending: list[_Slot] = []
        self._running = False

    def admit(self) -> None:
        """Spend one join attempt of the rate bound, or refuse with when to try again."""
        wait = self._bucket.take()
        if wait is not None:
            raise Throttled(
                f"too many joins at once; try again in {wait:.1f} s", retry_after_s=max(1.0, wait)
            )

    def join(self, join: Join) -> None:
        """Enrol the device of ``join`` (committed, broker accounts written) or raise why not."""
        slot = _Slot(join)
        with self._cond:
            self._pending.append(slot)
        while True:
            with self._cond:
                while self._running and not slot.done:
                    self._cond.wait()
                if slot.done:
                    break
                self._running = True
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error

    def _run(self, batch: list[_Slot]) -> None:
        try:
            self._commit(batch)
        except BaseException as exc:
            if len(batch) > 1:
                for slot in batch:
                    self._run([slot])
                return
            slot = batch[0]
            slot.error, slot.done = exc, True
            if isinstance(exc, EdgepackError):
                with self._sessions.begin() as s:
                    record_refusal(s, slot.join.request.device_id, str(exc))

    def _commit(self, batch: list[_Slot]) -> None:
        now = utcnow()
        change = self._fleet.change(
            lambda s: join_devices(s, [slot.join for slot in batch], now=now, reserved=self._reserved)
        )
        for slot, outcome in zip(batch, change.result, strict=True):
            slot.error, slot.done = outcome, True
