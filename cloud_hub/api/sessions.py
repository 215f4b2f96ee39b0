"""Dashboard sign-in sessions, kept by the hub: the cookie holds a random session id, never
the admin token.

The admin token used to be the cookie's value, so a cookie that leaked (a shared browser, a
proxy log) was the admin token itself, valid until the token changed, and signing out ended
nothing on the server. Now signing in makes a session row (only the id's sha256 is stored, so
a copy of the database holds no usable session), it expires after :data:`SESSION_TTL`, signing
out deletes it, and an admin can end every session at once.

Each session also has a CSRF token (:func:`csrf_token`), which the dashboard's script sends
with every request that changes something; see :mod:`cloud_hub.api.csrf` for why the cookie
alone does not prove a request came from the dashboard.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from sqlalchemy import String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from cloud_hub.db.base import Base, utcnow

SESSION_TTL = timedelta(hours=12)


class DashboardSession(Base):
    __tablename__ = "dashboard_sessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def csrf_token(session_id: str) -> str:
    """The session's CSRF token: an HMAC keyed by the session id, so it needs no column, it
    dies with the session, and neither the stored sha256 of the id nor the token reveals the
    other. A page that cannot read the hub's answers (another origin) cannot learn it."""
    return hmac.new(session_id.encode(), b"edgepack dashboard csrf token", hashlib.sha256).hexdigest()


def open_session(session: Session, *, ttl: timedelta = SESSION_TTL) -> str:
    """A new session; returns its id (for the cookie). Expired sessions are removed."""
    now = utcnow()
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
    session_id = secrets.token_urlsafe(32)
    session.add(DashboardSession(id_sha256=_hash(session_id), created_at=now, expires_at=now + ttl))
    return session_id


def session_valid(session: Session, session_id: str) -> bool:
    expires = session.scalar(
        select(DashboardSession.expires_at).where(DashboardSession.id_sha256 == _hash(session_id))
    )
    return expires is not None and expires > utcnow()


def close_session(session: Session, session_id: str) -> None:
    session.execute(delete(DashboardSession).where(DashboardSession.id_sha256 == _hash(session_id)))


def close_all_sessions(session: Session) -> int:
    result = session.execute(delete(DashboardSession))
    return int(getattr(result, "rowcount", 0) or 0)
