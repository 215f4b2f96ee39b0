"""Alembic's environment for the hub: runs on the connection ``cloud_hub.db.schema`` opens.

There is no ``alembic.ini``: the hub builds the configuration in code and hands the open
connection over in ``config.attributes["connection"]``, so the command line, the hub's
start-up check and the tests all migrate the same way.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

connection: Connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    # SQLite cannot ALTER most things in place: batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    # One transaction per revision: a run killed half-way leaves the last finished revision,
    # and the next run goes on from there.
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
