"""The deliveries as a work queue: claim what is due, record how each attempt went.

Claiming is safe across hub replicas: on PostgreSQL the due rows are read ``FOR UPDATE SKIP
LOCKED`` and leased (their next attempt moved past the request's timeout) in one short
transaction, so another replica skips them now and sees them leased afterwards. The
dispatcher renews the leases of what it still holds in each round; a replica that dies
leaves leases that run out a short while later, and the delivery goes out again (at least
once; receivers dedupe by ``webhook-id``). On SQLite one hub process is the only dispatcher.
A delivery is only claimed when no older delivery of the same subject is pending for its
subscription: deliveries go out in order per subject, each after the one before succeeded
or was dead-lettered.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, and_, bindparam, delete, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from cloud_hub.webhooks.tables import DEAD, DELIVERED, MAX_ERROR_CHARS, PENDING, Delivery, Subscription


@dataclass(frozen=True)
class Job:
    id: int
    subscription_id: str
    url: str
    secret: str
    message_id: str
    body: str
    attempts: int
    created_at: datetime


@dataclass(frozen=True)
class Outcome:
    job: Job
    error: str | None  # None: delivered


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    max_s: float
    max_age_s: float

    def delay_s(self, attempts: int) -> float:
        """Full jitter: a random wait up to the capped exponential (attempts >= 1)."""
        cap = min(self.max_s, self.base_s * 2 ** min(attempts - 1, 40))
        return random.uniform(cap / 10, cap)


def claim(
    session: Session,
    *,
    now: datetime,
    limit: int,
    in_flight: Mapping[str, int],
    per_subscription: int,
    lease_s: float,
) -> list[Job]:
    """Lease up to ``limit`` due deliveries, at most ``per_subscription`` in flight per subscription."""
    older = aliased(Delivery)
    blocked = exists().where(
        older.subscription_id == Delivery.subscription_id,
        older.subject == Delivery.subject,
        older.state == PENDING,
        older.id < Delivery.id,
    )
    # The candidates as (id, subscription) only, a page at a time: a subscription that is full
    # is left out of the next page, and no body is read before its delivery is chosen. Longest
    # due first, in the due index's order, so the database stops at the page's end (ordered by
    # id it checked and sorted every due row: 19 ms a round with 10,000 due, now 1.5 ms);
    # order per subject is the blocked test's, not this one's.
    page = 2 * min(limit, per_subscription)
    counts = dict(in_flight)
    chosen: list[int] = []
    after: tuple[datetime, int] | None = None
    while len(chosen) < limit:
        query = (
            select(Delivery.id, Delivery.subscription_id, Delivery.next_attempt_at)
            .where(Delivery.state == PENDING, Delivery.next_attempt_at <= now, ~blocked)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(page)
            .with_for_update(skip_locked=True)
        )
        full = [sub for sub, n in counts.items() if n >= per_subscription]
        if full:
            query = query.where(Delivery.subscription_id.not_in(full))
        if after is not None:
            query = query.where(
                or_(
                    Delivery.next_attempt_at > after[0],
                    and_(Delivery.next_attempt_at == after[0], Delivery.id > after[1]),
                )
            )
        rows = session.execute(query).all()
        for id_, sub, _due in rows:
            if len(chosen) >= limit:
                break
            if counts.get(sub, 0) >= per_subscription:
                continue
            counts[sub] = counts.get(sub, 0) + 1
            chosen.append(id_)
        if len(rows) < page:
            break
        after = (rows[-1].next_attempt_at, rows[-1].id)
    if not chosen:
        return []
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(chosen))
        .values(next_attempt_at=now + timedelta(seconds=lease_s)),
        execution_options={"synchronize_session": False},
    )
    picked = session.execute(
        select(
            Delivery.id,
            Delivery.subscription_id,
            Subscription.url,
            Subscription.secret,
            Delivery.message_id,
            Delivery.body,
            Delivery.attempts,
            Delivery.created_at,
        )
        .join(Subscription, Subscription.id == Delivery.subscription_id)
        .where(Delivery.id.in_(chosen))
        .order_by(Delivery.id)
    )
    return [Job(*row) for row in picked]


def record(session: Session, outcomes: Sequence[Outcome], *, now: datetime, policy: RetryPolicy) -> None:
    """Delivered, to be retried after a backoff, or dead once older than the policy's max age."""
    rows = []
    for o in outcomes:
        attempts = o.job.attempts + 1
        if o.error is None:
            state, next_at, done, error = DELIVERED, now, now, None
        elif (now - o.job.created_at).total_seconds() >= policy.max_age_s:
            state, next_at, done, error = DEAD, now, now, o.error[:MAX_ERROR_CHARS]
        else:
            next_at = now + timedelta(seconds=policy.delay_s(attempts))
            state, done, error = PENDING, None, o.error[:MAX_ERROR_CHARS]
        rows.append(
            {"b_id": o.job.id, "b_state": state, "b_attempts": attempts, "b_next": next_at,
             "b_done": done, "b_error": error}
        )
    if rows:
        # Core executemany: a delivery whose subscription was deleted meanwhile is no error.
        table = cast(Table, Delivery.__table__)
        session.execute(
            update(table).where(table.c.id == bindparam("b_id")).values(
                state=bindparam("b_state"),
                attempts=bindparam("b_attempts"),
                next_attempt_at=bindparam("b_next"),
                done_at=bindparam("b_done"),
                last_error=bindparam("b_error"),
            ),
            rows,
        )


def renew(session: Session, ids: Sequence[int], *, until: datetime) -> None:
    """Extend the lease of deliveries a dispatcher still holds (waiting for a slot, or in flight)."""
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(list(ids)), Delivery.state == PENDING)
        .values(next_attempt_at=until),
        execution_options={"synchronize_session": False},
    )


def release(session: Session, ids: Sequence[int], *, now: datetime) -> None:
    """End the lease of claimed deliveries whose attempt has no outcome (a stopping dispatcher)."""
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(list(ids)), Delivery.state == PENDING)
        .values(next_attempt_at=now),
        execution_options={"synchronize_session": False},
    )


def forget_delivered(session: Session, *, before: datetime) -> int:
    result = session.execute(delete(Delivery).where(Delivery.state == DELIVERED, Delivery.done_at < before))
    return int(getattr(result, "rowcount", 0) or 0)
