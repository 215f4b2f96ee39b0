"""Webhook subscriptions and their deliveries (the outbox).

A delivery row holds the whole CloudEvent it will send, written in the transaction that
recorded the event (:mod:`cloud_hub.webhooks.outbox`): trimming the event log never loses a
delivery, and a hub restart finds every pending one in the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cloud_hub.db.base import Base, utcnow

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"

#: The last error of a delivery is cut to this many characters (a receiver's answer is not
#: the hub's to store whole).
MAX_ERROR_CHARS = 500


class Subscription(Base):
    __tablename__ = "webhook_subscriptions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    #: the Standard Webhooks secret (whsec_...): stored, because the hub must sign with it
    secret: Mapped[str] = mapped_column(String(100))
    #: CloudEvents types wanted; empty: every type
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: {"service": ..., "device": ...}: only events about that service / device
    filters: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Delivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # The dispatcher's two questions: what is due, and is an older one of the same
        # subject still pending for this subscription (then this one waits: order per subject).
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_subject", "subscription_id", "subject", "state", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subscription_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("webhook_subscriptions.id", ondelete="CASCADE")
    )
    event_id: Mapped[int] = mapped_column(Integer)
    #: the CloudEvent's id: the same in every attempt, so receivers dedupe by it
    message_id: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(String(MAX_ERROR_CHARS), default=None)
    done_at: Mapped[datetime | None] = mapped_column(default=None)


def delivery_view(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "event_id": d.event_id,
        "message_id": d.message_id,
        "subject": d.subject,
        "attempts": d.attempts,
        "created_at": d.created_at.isoformat(),
        "last_error": d.last_error,
    }
