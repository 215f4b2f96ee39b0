"""The hub's data directory is private: 0700, and its database file 0600.

It holds the hub's signing key, the admin token, the hashes of every device token and broker
password, and (with SQLite) the database that has them all. Under a usual umask of 022 the
directory and ``hub.db`` came out world-readable; these checks make them private at every
start, whoever created them.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url

DIR_MODE = 0o700
FILE_MODE = 0o600


def prepare_data_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed and make it accessible to its owner only."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def private_sqlite_file(url: str) -> None:
    """For a SQLite URL, create the database file as 0600 before SQLite does (SQLite gives its
    WAL and shared-memory files the database file's mode), and make an existing one 0600."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if name.exists():
            os.chmod(name, FILE_MODE)
