"""The database schema's version: migrating it (Alembic) and checking it at start-up.

The revisions live in ``cloud_hub/db/migrations/versions``. A hub starts only on a database
whose schema is exactly the newest revision, or on an empty one (which it then creates by
running every revision, as ``create_all`` used to). On an older schema it refuses with one
line that says to run ``edgepack hub migrate``; it never upgrades a database by itself,
because an upgrade is the operator's decision (backups first, all replicas of the old
version stopped).

Each revision runs in its own transaction (PostgreSQL and SQLite both have transactional DDL;
for SQLite the migration connection issues ``BEGIN IMMEDIATE`` itself, which its Python driver would
otherwise leave out before DDL). A run killed half-way therefore leaves the schema at the last
finished revision, and the next run goes on from there. On PostgreSQL an advisory lock keeps
two replicas (or an operator and a replica) from migrating at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text

from manifests.errors import ConfigError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The revision a database made before migrations existed is at (tables, no version table).
BASELINE = "0001"
#: pg_advisory_lock key of a migration run ("edgepack" in ASCII, as a number).
ADVISORY_KEY = 0x6564676570616B


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


@dataclass(frozen=True)
class SchemaState:
    """What a database holds: no tables at all, the hub's tables unversioned, or a revision."""

    revision: str | None
    has_tables: bool

    @property
    def empty(self) -> bool:
        return not self.has_tables and self.revision is None


def schema_state(connection: Connection) -> SchemaState:
    revision = MigrationContext.configure(connection).get_current_revision()
    names = set(inspect(connection).get_table_names()) - {"alembic_version"}
    return SchemaState(revision=revision, has_tables=bool(names))


def _migration_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we say BEGIN ourselves (see the module docs)
        cur = dbapi_conn.cursor()
        # Off while tables are rebuilt: dropping a referenced table would otherwise cascade.
        cur.execute("PRAGMA foreign_keys=OFF")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # IMMEDIATE: take the write lock up front (waiting for it up to the busy timeout);
        # a deferred transaction that read first could not upgrade while another writer works.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def _migration_lock(connection: Connection) -> Iterator[None]:
    if connection.dialect.name != "postgresql":
        yield
        return
    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_KEY})
    connection.commit()  # the lock is the session's; the migrations run in their own transactions
    try:
        yield
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})
        connection.commit()


@dataclass(frozen=True)
class Migration:
    before: str | None  # None: an empty database
    after: str


def migrate(url: str) -> Migration:
    """Bring the database at ``url`` to the newest revision; safe to run again at any time."""
    engine = _migration_engine(url)
    try:
        with engine.connect() as connection, _migration_lock(connection):
            state = schema_state(connection)
            connection.commit()
            config = _config(connection)
            if state.revision is None and state.has_tables:
                command.stamp(config, BASELINE)  # made by create_all, before migrations
                connection.commit()
            command.upgrade(config, "head")
            connection.commit()
            before = BASELINE if state.revision is None and state.has_tables else state.revision
            return Migration(before=before, after=head_revision())
    finally:
        engine.dispose()


def ensure_schema(engine: Engine, url: str) -> None:
    """Create the schema of an empty database; refuse one that is not at the newest revision."""
    with engine.connect() as connection:
        state = schema_state(connection)
    head = head_revision()
    if state.empty:
        migrate(url)
        return
    if state.revision == head:
        return
    if state.revision is None:
        at = "was made before schema migrations existed"
    else:
        at = f"is at revision {state.revision}"
    raise ConfigError(
        f"the hub's database {at}, this hub needs revision {head}: back it up and run "
        "'edgepack hub migrate' (with the same --db/--data-dir) before starting the hub"
    )
