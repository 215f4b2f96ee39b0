"""The hub's alert loop: every few seconds, one evaluation round under a database lock.

Every replica runs the loop, but a round holds the ``alerts`` lock (:mod:`cloud_hub.db.locks`,
an advisory lock on PostgreSQL) for its whole transaction, so rounds never overlap and each
sees the states the previous one stored: an alert fires once, whichever replica saw it first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cloud_hub.alerts.evaluate import Transition
from cloud_hub.alerts.store import Window, evaluate_all
from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.db.locks import exclusive
from cloud_hub.rounds import Rounds

log = logging.getLogger(__name__)

LOCK = "alerts"


class AlertLoop(Rounds):
    thread_name = "alert-loop"

    def __init__(
        self,
        sessions: Sessions,
        window: Window,
        *,
        interval_s: float,
        on_round: Callable[[list[Transition]], None] | None = None,
    ) -> None:
        super().__init__(interval_s)
        self._sessions = sessions
        self._window = window
        self._on_round = on_round

    def run_once(self) -> list[Transition]:
        """One round; never raises (the loop must outlive a database hiccup)."""
        try:
            with exclusive(self._sessions, LOCK) as session:
                moved = evaluate_all(session, utcnow(), self._window)
        except Exception:
            log.exception("alert evaluation round failed")
            return []
        for t in moved:
            log.info("%s", t.message)
        if self._on_round is not None:
            self._on_round(moved)
        return moved
