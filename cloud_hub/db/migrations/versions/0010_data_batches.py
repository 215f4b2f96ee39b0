"""Collected production data: the batches the hub holds, and the services devices lost
(docs/data-collection.md).

Revision ID: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision: str | None = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_batches",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("digest", sa.String(length=71), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("service", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("designation", sa.String(length=32), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.UniqueConstraint("device_id", "digest", name="uq_data_batches_device_digest"),
    )
    op.create_index("ix_data_batches_service_id", "data_batches", ["service", "id"])
    op.create_index("ix_data_batches_received_at", "data_batches", ["received_at"])
    op.create_table(
        "data_sources",
        sa.Column("device_id", sa.String(length=64), primary_key=True),
        sa.Column("service", sa.String(length=64), primary_key=True),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("data_sources")
    op.drop_index("ix_data_batches_received_at", table_name="data_batches")
    op.drop_index("ix_data_batches_service_id", table_name="data_batches")
    op.drop_table("data_batches")
