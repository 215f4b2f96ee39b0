"""What a fleet change asks of the world outside the database, as data.

A fleet decision (:func:`cloud_hub.fleet.desired.change_fleet`, a renewal) commits its rows
and returns :class:`Effects`; it never publishes or touches the broker itself. One executor
(:class:`cloud_hub.fleet.executor.EffectExecutor`) applies them, so a route, the upkeep loop
and a test all see the same thing happen, and a test can check a decision without a broker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Effects:
    """Effects of one committed change.

    ``issued``: device id → the generation just stored; its signed state is to be published.
    ``cleared``: devices left without a state (revoked); their retained message is removed.
    ``accounts_changed``: the set of broker accounts (device id, password) changed, so the
    broker's accounts and permissions must be made to follow the device table.
    """

    issued: Mapping[str, int] = field(default_factory=dict)
    cleared: frozenset[str] = frozenset()
    accounts_changed: bool = False

    @property
    def to_publish(self) -> list[str]:
        """Every device whose retained desired state must change, sorted."""
        return sorted(set(self.issued) | self.cleared)


@dataclass(frozen=True)
class Applied:
    """What the executor did with some effects: ``published`` is None without a broker."""

    published: bool | None = None
    publish_errors: list[str] = field(default_factory=list)
