"""Background upkeep of desired states: renew them before they expire, republish on request.

A device that only listens on MQTT never asks the hub for anything, so its desired state must
be renewed by the hub before it expires (``settings.desired_ttl_s``). And a broker that lost
its retained messages (restarted without persistence) must be given them again; the MQTT link
calls :meth:`FleetMaintenance.request_republish` when it (re)connects. Publishing waits for the
broker's acknowledgement, so it must never run on paho's network thread — hence this thread.

Several hub replicas may each run one: renewals happen under the fleet lock and are skipped
when another replica already renewed, and republishing the same bytes is harmless.

It is given the two jobs it runs as plain callables, not the hub that owns them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger(__name__)


class FleetMaintenance:
    def __init__(
        self,
        *,
        renew: Callable[[], Mapping[str, int]],
        republish: Callable[[], Sequence[str]] | None,
        pending: Callable[[], Sequence[str]] | None = None,
        interval_s: float = 5.0,
        chores: Sequence[Callable[[], object]] = (),
    ) -> None:
        """``renew`` re-issues (and publishes) what is due; ``republish`` publishes every
        stored state again and ``pending`` every state not published yet (by any replica),
        each returning the errors (None: the hub runs without a broker). Every round is cheap
        when there is nothing to do, so rounds are seconds apart: a state a dead replica left
        unpublished goes out within one interval."""
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._renew = renew
        self._republish_all = republish
        self._pending = pending
        # Other periodic work that rate-limits itself (collected data's retention).
        self._chores = tuple(chores)
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._republish = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="fleet-maintenance", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def request_republish(self) -> None:
        """Ask for every device's desired state to be published again (returns at once)."""
        self._republish.set()
        self._wake.set()

    def run_once(self) -> None:
        """One round: republish if asked, publish what is pending, renew what is due. Never raises."""
        try:
            if self._republish.is_set():
                self._republish.clear()
                errors = self._republish_all() if self._republish_all is not None else []
                if errors:
                    self._republish.set()  # try again next round
            if self._pending is not None:
                self._pending()
            renewed = self._renew()
            if renewed:
                log.info("renewed the desired state of %d device(s)", len(renewed))
            for chore in self._chores:
                chore()
        except Exception:
            # The loop must outlive a database or broker hiccup; the next round retries.
            log.exception("fleet maintenance round failed")

    def _run(self) -> None:
        retry_s = 1.0
        while not self._stop.is_set():
            self.run_once()
            if self._republish.is_set():
                # A republish that failed (broker flapping, no acknowledgement in time) is
                # retried soon, with backoff, instead of a whole interval later.
                wait_s = min(retry_s, self.interval_s)
                retry_s = min(retry_s * 2, 30.0)
            else:
                wait_s, retry_s = self.interval_s, 1.0
            self._wake.wait(wait_s)
            self._wake.clear()
