"""The desired-state generation at which each service last changed on each device.

A settings-only change (a new port, say) keeps the module's digest, so a device's report from
before the change looked like the answer to it, and ``service wait`` in a new process ended at
once with the old state. With this table the roll-up sees a report on an earlier generation as
Transitioning. Existing devices start with no rows: their current reports stand, as before.

Revision ID: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "service_changes",
        sa.Column(
            "device_id",
            sa.String(length=64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("service", sa.String(length=64), primary_key=True),
        sa.Column("generation", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("service_changes")
