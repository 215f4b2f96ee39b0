"""Routes: webhook subscriptions and their dead letters (admin only; docs/webhooks.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.api.deps import Admin, Core
from cloud_hub.webhooks.catalog import MAX_EVENT_TYPES, MAX_URL_CHARS
from cloud_hub.webhooks.subscriptions import (
    add_subscription,
    dead_letters,
    list_subscriptions,
    remove_subscription,
    replay,
    subscription_view,
)

router = APIRouter(prefix="/api/v1/webhooks", dependencies=[Admin])


class NewWebhook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=MAX_URL_CHARS)
    events: list[str] = Field(default_factory=list, max_length=MAX_EVENT_TYPES)
    filters: dict[str, str] = Field(default_factory=dict, max_length=2)


class Replay(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[int] | None = Field(default=None, max_length=10_000)


@router.get("")
def list_webhooks(core: Core) -> list[dict[str, Any]]:
    with core.sessions.begin() as s:
        return [subscription_view(sub) for sub in list_subscriptions(s)]


@router.post("", status_code=201)
def add_webhook(body: NewWebhook, core: Core) -> dict[str, Any]:
    """The new subscription, with its signing secret: the only answer that shows it."""
    with core.sessions.begin() as s:
        sub = add_subscription(
            s,
            url=body.url,
            events=body.events,
            filters=body.filters,
            max_subscriptions=core.settings.webhook_max_subscriptions,
        )
        return subscription_view(sub, secret=True)


@router.delete("/{sub_id}")
def remove_webhook(sub_id: str, core: Core) -> dict[str, Any]:
    with core.sessions.begin() as s:
        remove_subscription(s, sub_id)
    return {"deleted": sub_id}


@router.get("/{sub_id}/dead")
def list_dead(sub_id: str, core: Core) -> list[dict[str, Any]]:
    with core.sessions.begin() as s:
        return dead_letters(s, sub_id)


@router.post("/{sub_id}/replay")
def replay_dead(sub_id: str, core: Core, body: Replay | None = None) -> dict[str, Any]:
    with core.sessions.begin() as s:
        count = replay(s, sub_id, body.ids if body is not None else None)
    return {"replayed": count}
