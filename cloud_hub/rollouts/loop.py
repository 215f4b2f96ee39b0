"""The hub's rollout loop: every few seconds, each running rollout's next step.

Every replica runs it. A round reads each running rollout (a snapshot: no lock), decides with
:func:`cloud_hub.rollouts.engine.decide` and, when there is something to do, applies it in a
fleet change that first checks the row is still at the step it read
(:func:`cloud_hub.rollouts.store.apply`). Two replicas deciding the same promotion therefore
promote once: the second finds the step moved and does nothing. Nothing is kept in memory
between rounds, so a restarted hub goes on from the rows: a bake that started before the
restart ends when its row says.
"""

from __future__ import annotations

import logging

from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.fleet.changes import FleetChanges
from cloud_hub.rollouts import store
from cloud_hub.rollouts.engine import Wait, decide
from cloud_hub.rollouts.tables import Rollout
from cloud_hub.rounds import Rounds

log = logging.getLogger(__name__)


class RolloutLoop(Rounds):
    thread_name = "rollout-loop"

    def __init__(
        self, sessions: Sessions, fleet: FleetChanges, *, interval_s: float, max_samples: int
    ) -> None:
        super().__init__(interval_s)
        self._sessions = sessions
        self._fleet = fleet
        self._max_samples = max_samples

    def run_once(self) -> list[str]:
        """One round; what it did (an event kind, or ``rollout.baking``). Never raises (the
        loop must outlive a database hiccup or one broken rollout)."""
        done: list[str] = []
        try:
            with self._sessions.snapshot() as s:
                running = store.active_services(s)
        except Exception:
            log.exception("rollout round failed")
            return done
        for service, step in running:
            try:
                kind = self._advance(service, step)
            except Exception:
                log.exception("rollout of service %s: step failed", service)
                continue
            if kind is not None:
                done.append(kind)
        return done

    def _advance(self, service: str, step: int) -> str | None:
        now = utcnow()
        with self._sessions.snapshot() as s:
            row = s.get(Rollout, service)
            if row is None or row.step != step:
                return None
            seen = store.observe(s, row)
            decision = decide(
                store.progress_of(row),
                seen.health,
                lambda since: store.cohorts(s, row, seen, since, self._max_samples),
                now,
            )
        if isinstance(decision, Wait):
            return None
        outcome = self._fleet.change(lambda session: store.apply(session, service, step, decision))
        if outcome.result is not None:
            log.info("rollout of service %s: %s (%s)", service, outcome.result, decision)
        return outcome.result
