"""``hub.alerts``: the hub's alert rules and the alerts firing now.

A rule's condition is the compact form the hub parses (``'error_rate > 1% for 5m'``,
``'p95_ms > 50 for 10m'``, ``'device offline > 15m'``, ``'state == Failed'``); a condition the
hub cannot read is a :class:`~packager.sdk.errors.HubRejected` naming what to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from packager.sdk.hub import Hub


@dataclass(frozen=True)
class AlertRule:
    name: str
    condition: str
    service: str | None  # None: every service (fleet-wide)
    severity: str
    raw: dict[str, Any]

    @classmethod
    def of(cls, raw: dict[str, Any]) -> AlertRule:
        return cls(raw["name"], raw["condition"], raw["service"], raw["severity"], raw)


@dataclass(frozen=True)
class Alert:
    """An alert firing now: which rule, about which service or device, since when."""

    rule: str
    severity: str
    service: str | None
    device_id: str | None
    value: str | None
    fired_at: str | None
    message: str | None
    raw: dict[str, Any]

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Alert:
        return cls(
            raw["rule"], raw["severity"], raw["service"], raw["device_id"], raw["value"],
            raw["fired_at"], raw["message"], raw,
        )  # fmt: skip


class Alerts:
    """The alert rules of ``hub`` (``hub.alerts``)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def add(
        self, condition: str, *, name: str, service: str | None = None, severity: str = "warning"
    ) -> AlertRule:
        """Add a rule about ``service`` (None: every service); names are unique."""
        body = {"name": name, "condition": condition, "service": service, "severity": severity}
        return AlertRule.of(self._hub.transport.send("POST", "/api/v1/alerts/rules", body))

    def rules(self) -> list[AlertRule]:
        return [AlertRule.of(r) for r in self._hub.transport.get("/api/v1/alerts/rules")["rules"]]

    def remove(self, name: str) -> None:
        """Remove a rule (its firing alerts end with it)."""
        self._hub.transport.request("DELETE", f"/api/v1/alerts/rules/{quote(name, safe='')}")

    def active(self) -> list[Alert]:
        """The alerts firing now, newest first."""
        return [Alert.of(a) for a in self._hub.transport.get("/api/v1/alerts")["alerts"]]
