"""Engine, sessions and the declarative base.

The same code runs on SQLite (default) and PostgreSQL: only portable SQL, no SQLite-only
features. State that two hub replicas could disagree on lives here, never in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # As many pooled connections as the server has worker threads (anyio's 40): a
        # connection over the pool's size is closed on return, and opening one (pragmas, schema
        # read) cost more than the query when a fleet's downloads came in at once.
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=40, max_overflow=20
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def import_tables() -> None:
    """Import each area's table module so that every table is registered with ``Base``."""
    import cloud_hub.alerts.tables
    import cloud_hub.api.sessions
    import cloud_hub.data.tables
    import cloud_hub.events
    import cloud_hub.fleet.tables
    import cloud_hub.ingest.tables
    import cloud_hub.registry.tables
    import cloud_hub.rollouts.tables
    import cloud_hub.webhooks.outbox
    import cloud_hub.webhooks.tables  # noqa: F401


def utcnow() -> datetime:
    return datetime.now(UTC)


class Sessions:
    """A session factory with a transactional scope."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._factory = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """A session whose work commits at the end of the block, or rolls back on error."""
        with self._factory() as session, session.begin():
            yield session

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only session whose statements all see the database as it was at its first.

        PostgreSQL's default isolation (READ COMMITTED) gives each statement a snapshot of its
        own, so an answer built from several queries could pair a device's new state with the
        last-seen time from before that report; REPEATABLE READ reads one snapshot throughout.
        SQLite runs a transaction's reads against one snapshot already."""
        with self._factory() as session:
            if self.engine.dialect.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            try:
                yield session
            finally:
                session.rollback()
