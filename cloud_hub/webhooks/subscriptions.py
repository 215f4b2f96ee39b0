"""Subscriptions: add, list, remove; dead letters: list and replay."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from cloud_hub.db.base import utcnow
from cloud_hub.errors import Conflict, NotFound
from cloud_hub.webhooks.catalog import check_filters, check_types, check_url
from cloud_hub.webhooks.tables import DEAD, PENDING, Delivery, Subscription, delivery_view

#: Dead letters listed per request.
MAX_DEAD_LISTED = 1000


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def subscription_view(sub: Subscription, *, secret: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": sub.id,
        "url": sub.url,
        "events": list(sub.events or []),
        "filters": dict(sub.filters or {}),
        "created_at": sub.created_at.isoformat(),
    }
    if secret:  # only in the answer to its creation
        view["secret"] = sub.secret
    return view


def add_subscription(
    session: Session, *, url: str, events: Sequence[str], filters: Mapping[str, str], max_subscriptions: int
) -> Subscription:
    sub = Subscription(
        id="wh_" + secrets.token_hex(8),
        url=check_url(url),
        secret=new_secret(),
        events=check_types(events),
        filters=check_filters(filters),
        created_at=utcnow(),
    )
    count = session.scalar(select(func.count()).select_from(Subscription)) or 0
    if count >= max_subscriptions:
        raise Conflict(f"the hub has {count} webhook subscriptions, its limit (webhook_max_subscriptions)")
    session.add(sub)
    session.flush()
    return sub


def get_subscription(session: Session, sub_id: str) -> Subscription:
    sub = session.get(Subscription, sub_id)
    if sub is None:
        raise NotFound(f"no webhook subscription {sub_id[:60]!r} (see 'edgepack hub webhook list')")
    return sub


def list_subscriptions(session: Session) -> list[Subscription]:
    return list(session.scalars(select(Subscription).order_by(Subscription.created_at, Subscription.id)))


def remove_subscription(session: Session, sub_id: str) -> None:
    sub = get_subscription(session, sub_id)
    # Deliveries first: SQLite only cascades with its foreign-key pragma on.
    session.execute(
        delete(Delivery).where(Delivery.subscription_id == sub.id),
        execution_options={"synchronize_session": False},
    )
    session.delete(sub)


def dead_letters(session: Session, sub_id: str, *, limit: int = MAX_DEAD_LISTED) -> list[dict[str, Any]]:
    get_subscription(session, sub_id)
    rows = session.scalars(
        select(Delivery)
        .where(Delivery.subscription_id == sub_id, Delivery.state == DEAD)
        .order_by(Delivery.id)
        .limit(min(limit, MAX_DEAD_LISTED))
    )
    return [delivery_view(d) for d in rows]


def replay(session: Session, sub_id: str, ids: Sequence[int] | None = None) -> int:
    """Put dead deliveries (all, or those ``ids``) back to pending with a fresh retry window."""
    get_subscription(session, sub_id)
    now = utcnow()
    query = update(Delivery).where(Delivery.subscription_id == sub_id, Delivery.state == DEAD)
    if ids is not None:
        query = query.where(Delivery.id.in_(list(ids)))
    result = session.execute(
        query.values(state=PENDING, attempts=0, created_at=now, next_attempt_at=now, done_at=None),
        execution_options={"synchronize_session": False},
    )
    return int(getattr(result, "rowcount", 0) or 0)
