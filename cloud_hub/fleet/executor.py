"""The one place where the effects of fleet changes are applied: publishes and broker accounts.

Routes and the upkeep loop hand it the :class:`~cloud_hub.fleet.effects.Effects` a committed
decision returned. Publishing comes first (the device's state is what it waits for), then the
broker accounts. A broker-account failure does not fail the request: the change is committed
(and an enrolment's credentials exist only in its answer), so it is logged and recorded as an
event, and the next account change or the next start-up writes the accounts again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from cloud_hub.db.base import Sessions
from cloud_hub.events import record_event
from cloud_hub.fleet.effects import Applied, Effects
from cloud_hub.fleet.publish import DesiredPublisher
from manifests.errors import EdgepackError

log = logging.getLogger(__name__)


class AccountSync(Protocol):
    """Makes the broker's device accounts and permissions follow the device table."""

    def sync(self) -> None: ...


class EffectExecutor:
    """Applies effects with the parts this hub runs (no publisher: no broker configured)."""

    def __init__(
        self,
        sessions: Sessions,
        *,
        publisher: DesiredPublisher | None,
        accounts: AccountSync | None,
        on_issued: Callable[[Iterable[str]], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._publisher = publisher
        self._accounts = accounts
        self._on_issued = on_issued

    def apply(self, effects: Effects) -> Applied:
        applied = Applied()
        devices = effects.to_publish
        if self._on_issued is not None and devices:
            # First, before the device hears of its new state: what this replica remembers of
            # its old one (download grants) must not outlive it here.
            self._on_issued(devices)
        if self._publisher is not None and devices:
            errors = self._publisher.publish_current(devices)
            applied = Applied(published=not errors, publish_errors=errors)
        if effects.accounts_changed:
            self.sync_accounts()
        return applied

    def sync_accounts(self) -> None:
        """Bring the broker's accounts in line with the device table now; never raises."""
        if self._accounts is None:
            return
        try:
            self._accounts.sync()
        except (EdgepackError, OSError) as exc:
            log.warning("broker accounts not updated: %s", exc)
            with self._sessions.begin() as s:
                record_event(s, "broker-sync-failed", f"broker accounts/permissions not updated: {exc}")
