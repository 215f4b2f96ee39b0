"""Alert rules and their state per subject (cloud_hub.alerts); telemetry samples indexed by
the time they were received, as each alert round reads the newest window of them.

Revision ID: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_rules",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("service", sa.String(length=64), nullable=True),
        sa.Column("metric", sa.String(length=20), nullable=False),
        sa.Column("operator", sa.String(length=2), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=True),
        sa.Column("for_s", sa.Integer(), nullable=False),
        sa.Column("severity", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "alert_states",
        sa.Column(
            "rule",
            sa.String(length=64),
            sa.ForeignKey("alert_rules.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("subject", sa.String(length=80), primary_key=True),
        sa.Column("service", sa.String(length=64), nullable=True),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("pending_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("firing", sa.Boolean(), nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("value", sa.String(length=40), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
    )
    op.create_index("ix_telemetry_received_at", "telemetry_samples", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_telemetry_received_at", table_name="telemetry_samples")
    op.drop_table("alert_states")
    op.drop_table("alert_rules")
