"""Publish state in the database: what each device's retained desired state last was.

Several replicas publish; which generation the broker holds for a device is shared state, so
it lives beside the state itself. Existing rows start as "never published", which makes the
next hub publish every stored state once (the same bytes again: harmless).

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device_desired") as batch:
        batch.add_column(sa.Column("published_generation", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("published_cleared", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("device_desired") as batch:
        batch.drop_column("published_cleared")
        batch.drop_column("published_generation")
