"""``Webhook``: a subscription that has the hub send its events, as signed CloudEvents, to a URL.

``Webhook.add(hub, url, events=["model.registered"], filters={"service": "digits"})`` answers
the subscription with its signing secret (``whsec_...``), shown this once: receivers verify
each delivery's Standard Webhooks headers with it (docs/webhooks.md).
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence

from packager.sdk.answers import DeadLetter, WebhookRecord
from packager.sdk.errors import BadArgument
from packager.sdk.hub import Hub


def _check_id(webhook_id: str) -> str:
    if not isinstance(webhook_id, str) or not webhook_id.startswith("wh_") or len(webhook_id) > 40:
        shown = str(webhook_id)[:60]
        raise BadArgument(f"webhook id {shown!r}: give an id as 'edgepack hub webhook list' shows")
    return webhook_id


class Webhook:
    """Subscriptions of a hub (admin only)."""

    @staticmethod
    def add(
        workspace: Hub,
        url: str,
        *,
        events: Sequence[str] = (),
        filters: Mapping[str, str] | None = None,
    ) -> WebhookRecord:
        """Subscribe ``url`` to ``events`` (CloudEvents types, with or without ``edgepack.``;
        none: all), only those about the ``filters``' service and device."""
        if not isinstance(url, str) or not url:
            raise BadArgument("Webhook.add: give the receiver's http:// or https:// URL")
        body = {"url": url, "events": list(events), "filters": dict(filters or {})}
        return WebhookRecord.of(workspace.transport.send("POST", "/api/v1/webhooks", body))

    @staticmethod
    def list(workspace: Hub) -> builtins.list[WebhookRecord]:
        return [WebhookRecord.of(item) for item in workspace.transport.get("/api/v1/webhooks")]

    @staticmethod
    def remove(workspace: Hub, webhook_id: str) -> None:
        workspace.transport.send("DELETE", f"/api/v1/webhooks/{_check_id(webhook_id)}")

    @staticmethod
    def dead(workspace: Hub, webhook_id: str) -> builtins.list[DeadLetter]:
        """The deliveries dead-lettered for a subscription, oldest first."""
        items = workspace.transport.get(f"/api/v1/webhooks/{_check_id(webhook_id)}/dead")
        return [DeadLetter.of(item) for item in items]

    @staticmethod
    def replay(workspace: Hub, webhook_id: str, ids: Sequence[int] | None = None) -> int:
        """Send dead letters (all, or those ``ids``) again, with a fresh retry window; how many."""
        body = {"ids": list(ids)} if ids is not None else {}
        answer = workspace.transport.send("POST", f"/api/v1/webhooks/{_check_id(webhook_id)}/replay", body)
        return int(answer["replayed"])
