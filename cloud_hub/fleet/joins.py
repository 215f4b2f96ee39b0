"""Joins enrolled in batches: one fleet change and one broker reload for many devices.

A fleet change takes the fleet lock, reads the plan and rewrites the broker's accounts; one per
join would make 5,000 joins cost 5,000 account rewrites of a growing file. Joins arriving
together are therefore committed together (a group commit): one thread takes every waiting
join (up to ``max_batch``) and runs them as one change, while the requests wait for their
answer without holding a thread. Each join is still judged alone (:func:`join_devices`); a batch
that fails as a whole (e.g. a port clash the tags of one device cause) is retried one by one,
so one bad join never refuses another.

Joins are rate-bounded per hub process (a token bucket): a flood of join attempts, valid or
not, costs at most that many signature checks and database visits a second. In front of it,
wrong joins (no token of this hub, or a request that is not a valid one) are throttled per
client address like wrong admin tokens (:mod:`cloud_hub.login_throttle`): a blocked address is
refused before it spends the shared bucket, so one client cannot starve every other device's
join, nor write a refusal event per attempt.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.errors import Throttled
from cloud_hub.fleet.changes import FleetChanges
from cloud_hub.fleet.provisioning import Join, Joined, Pending, join_devices, record_refusal
from cloud_hub.login_throttle import LoginThrottle, ThrottlePolicy
from manifests.errors import EdgepackError, HubUnavailable

log = logging.getLogger(__name__)


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


class JoinQueue:
    """Joins waiting to be enrolled, and the one thread that commits them in batches.

    :meth:`submit` returns a future at once, so a waiting join holds no request thread: the
    batch is as large as the joins that arrived meanwhile (up to ``max_batch``), not as the
    server's thread pool.
    """

    def __init__(
        self, fleet: FleetChanges, sessions: Sessions, *, reserved: str | None, max_batch: int,
        rate_per_s: float, burst: float, throttle: ThrottlePolicy | None = None,
    ) -> None:  # fmt: skip
        self._fleet = fleet
        self.throttle = LoginThrottle(throttle or ThrottlePolicy())
        self._sessions = sessions
        self._reserved = reserved
        self._max_batch = max_batch
        self._bucket = TokenBucket(rate_per_s, burst)
        self._cond = threading.Condition()
        self._pending: list[tuple[Join, Future[Joined | Pending]]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def admit(self, client: str) -> None:
        """Spend one join attempt of the rate bound, or refuse with when to try again: first
        an address blocked for its wrong joins (:meth:`wrong`), without spending the bound."""
        blocked = self.throttle.retry_after(client)
        if blocked > 0:
            raise Throttled(
                f"too many wrong joins from {client}; try again in {math.ceil(blocked)} s",
                retry_after_s=blocked,
            )
        wait = self._bucket.take()
        if wait is not None:
            raise Throttled(
                f"too many joins at once; try again in {wait:.1f} s", retry_after_s=max(1.0, wait)
            )

    def wrong(self, client: str) -> bool:
        """Count a wrong join of ``client`` (it may start a block); True when that block
        begins a throttling episode (the one moment to record it)."""
        return self.throttle.admit(client).episode_started

    def succeeded(self, client: str) -> None:
        """A join of ``client`` with a token of this hub: its wrong ones are forgotten."""
        self.throttle.succeeded(client)

    def submit(self, join: Join) -> Future[Joined | Pending]:
        """A future that ends when the device of ``join`` is enrolled (committed, broker
        accounts written), or with the refusal."""
        future: Future[Joined | Pending] = Future()
        with self._cond:
            if self._stopping:
                raise HubUnavailable("the hub is stopping; join again in a moment")
            self._pending.append((join, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="join-batches", daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            if not batch:
                return  # stopping, and nothing left
            try:
                self._run(batch)
            except BaseException as exc:  # the thread must outlive any one batch
                log.exception("join batch failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)

    def _run(self, batch: list[tuple[Join, Future[Joined | Pending]]]) -> None:
        try:
            outcomes = self._commit([join for join, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                for one in batch:  # one bad join (e.g. a port clash its tags cause) refuses only itself
                    self._run([one])
                return
            join, future = batch[0]
            if isinstance(exc, EdgepackError):
                with self._sessions.begin() as s:
                    record_refusal(s, join.request.device_id, str(exc))
            future.set_exception(exc)
            return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Joined | Pending):
                future.set_result(outcome)
            else:
                future.set_exception(outcome)

    def _commit(self, joins: list[Join]) -> list[Joined | Pending | EdgepackError]:
        now = utcnow()
        # A join can move no device but its own: only the joined devices are planned.
        change = self._fleet.change_devices(
            lambda s: join_devices(s, joins, now=now, reserved=self._reserved),
            lambda results: [
                j.request.device_id for j, r in zip(joins, results, strict=True) if isinstance(r, Joined)
            ],
        )
        return change.result
