"""Changing the fleet: decide in the database, then apply the effects, in one call.

Routes and upkeep use :class:`FleetChanges`; it runs a decision from
:mod:`cloud_hub.fleet.desired` (which commits and returns effects as data) and hands the
effects to the executor. Nothing else publishes or touches the broker's accounts.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from cloud_hub.db.base import Sessions
from cloud_hub.fleet.desired import DesiredSigner, change_devices, change_fleet, is_expiring, renew_expiring
from cloud_hub.fleet.effects import Applied, Effects
from cloud_hub.fleet.executor import EffectExecutor

R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """A committed change: the mutation's result, its effects, and what applying them did."""

    result: R
    effects: Effects
    applied: Applied

    @property
    def issued(self) -> dict[str, int]:
        return dict(self.effects.issued)


_collector_lock = threading.Lock()
_collector_pauses = 0
_collector_was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (on again after the last of any
    overlapping blocks, if it was on before the first).

    A fleet-wide change allocates a few objects per device (plans, payloads, rows); each
    700 allocations start a collection, and the older generations' collections walk the
    whole heap: about a fifth of a 5,000-device change's CPU. Nothing it allocates is cyclic
    garbage worth collecting mid-change; the collector runs again right after.
    """
    global _collector_pauses, _collector_was_enabled
    with _collector_lock:
        if _collector_pauses == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _collector_pauses += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_pauses -= 1
            if _collector_pauses == 0 and _collector_was_enabled:
                gc.enable()


class FleetChanges:
    def __init__(self, sessions: Sessions, signer: DesiredSigner, executor: EffectExecutor) -> None:
        self._sessions = sessions
        self._signer = signer
        self._executor = executor

    def change(self, mutate: Callable[[Session], R]) -> Outcome[R]:
        """Apply ``mutate`` (see :func:`change_fleet`), then its effects."""
        start = time.perf_counter()
        with collector_paused():
            change = change_fleet(self._sessions, self._signer, mutate)
            decided = time.perf_counter()
            applied = self._executor.apply(change.effects)
        if change.effects.issued or change.effects.accounts_changed:
            # Where a fleet-wide change spends its time (bench/fleet.py reads this line).
            log.info(
                "fleet change: %d device(s) issued in %.3fs, applied in %.3fs",
                len(change.effects.issued), decided - start, time.perf_counter() - decided,
            )  # fmt: skip
        return Outcome(change.result, change.effects, applied)

    def change_devices(
        self, mutate: Callable[[Session], R], devices: Callable[[R], Sequence[str]]
    ) -> Outcome[R]:
        """Apply ``mutate``, which can move only the devices ``devices`` names (see
        :func:`change_devices`), then its effects."""
        start = time.perf_counter()
        change = change_devices(self._sessions, self._signer, mutate, devices)
        decided = time.perf_counter()
        applied = self._executor.apply(change.effects)
        log.info(
            "fleet change: %d device(s) issued in %.3fs, applied in %.3fs",
            len(change.effects.issued), decided - start, time.perf_counter() - decided,
        )  # fmt: skip
        return Outcome(change.result, change.effects, applied)

    def change_accounts(self, mutate: Callable[[Session], R]) -> R:
        """Apply ``mutate``, which changes broker accounts and nothing any device runs (a
        credentials rotation), then bring the broker in line: no fleet lock, no plan."""
        with self._sessions.begin() as session:
            result = mutate(session)
        self._executor.apply(Effects(accounts_changed=True))
        return result

    def renew_expiring(self, device_ids: Sequence[str] | None = None) -> dict[str, int]:
        """Renew the states that are due (see :func:`renew_expiring`) and publish them."""
        with collector_paused():
            effects = renew_expiring(self._sessions, self._signer, device_ids)
            self._executor.apply(effects)
        return dict(effects.issued)

    def renew_if_expiring(self, device_id: str) -> None:
        """Renew one device's state if it is due (the cheap check first, without the lock)."""
        if is_expiring(self._sessions, device_id, self._signer.ttl_s):
            self.renew_expiring([device_id])
