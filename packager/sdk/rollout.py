"""How a deployment change reaches its devices: all at once (default) or in gated waves.

``Rollout.waves("1%,10%,50%,100%", bake="2m", gates=["error_rate<1%", "p95_ms<1.5x"])`` is
checked here, before anything is sent (the same rules as the hub's, ``manifests.rollout``),
and passed as ``rollout=`` to :meth:`Hub.deploy` or :meth:`Webservice.update`
(docs/rollouts.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from manifests.rollout import RolloutSpec, parse_rollout


class Rollout:
    """Factory of rollout strategies (the value sent is a :class:`RolloutSpec`)."""

    @staticmethod
    def all() -> RolloutSpec:
        """Every targeted device at once (what a deploy does without ``rollout``)."""
        return RolloutSpec()

    @staticmethod
    def waves(
        waves: str,
        *,
        bake: str = "2m",
        gates: Sequence[str] = (),
        on_failure: str = "rollback",
        spread_by: str | None = None,
        health_timeout: str | None = None,
    ) -> RolloutSpec:
        """Waves of rising shares of the devices (``"1%,10%,100%"``), each baked for ``bake``
        and judged by ``gates``; ``on_failure`` ``"rollback"`` or ``"halt"``."""
        raw: dict[str, object] = {
            "waves": waves,
            "bake": bake,
            "gates": list(gates),
            "on_failure": on_failure,
        }
        if spread_by is not None:
            raw["spread_by"] = spread_by
        if health_timeout is not None:
            raw["health_timeout"] = health_timeout
        return parse_rollout(raw)
