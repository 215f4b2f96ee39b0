"""Progressive rollouts: one row per service with the state of its rollout (docs/rollouts.md).

Revision ID: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision: str | None = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column(
            "service",
            sa.String(length=64),
            sa.ForeignKey("deployments.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("rollout_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("waves", sa.JSON(), nullable=False),
        sa.Column("bake_s", sa.Float(), nullable=False),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.Column("on_failure", sa.String(length=10), nullable=False),
        sa.Column("spread_by", sa.String(length=64), nullable=True),
        sa.Column("health_timeout_s", sa.Float(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("from_module", sa.String(length=64), nullable=False),
        sa.Column("from_version", sa.String(length=64), nullable=False),
        sa.Column("from_digest", sa.String(length=71), nullable=False),
        sa.Column("to_version", sa.String(length=64), nullable=False),
        sa.Column("to_digest", sa.String(length=71), nullable=False),
        sa.Column("wave_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bake_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rollouts")
