"""Named locks held by the database, for work two hub replicas must not do at the same time.

On PostgreSQL a transaction-scoped advisory lock (``pg_advisory_xact_lock``): held until the
transaction ends, released by the server if the replica dies. SQLite has no such thing, and a
hub on SQLite is one process, so there a process lock does the same.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.orm import Session

from cloud_hub.db.base import Sessions

_local: dict[str, threading.Lock] = {}
_local_guard = threading.Lock()


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``name`` (what pg_advisory_xact_lock takes)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def exclusive(sessions: Sessions, name: str) -> Iterator[Session]:
    """A transaction that holds the lock ``name`` from its first statement to its end."""
    with _local_guard:
        local = _local.setdefault(name, threading.Lock())
    with local, sessions.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(name)})
        yield session


def lock_in(session: Session, name: str) -> None:
    """Hold the lock ``name`` until ``session``'s transaction ends (PostgreSQL). On SQLite the
    caller's process is the only hub and its one writer thread already does the work alone."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key(name)})
