"""Zero-touch enrolment: provisioning tokens, joins waiting for approval, and the key a device
joined with (docs/enrolment.md).

Revision ID: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
# Follows 0010 on this branch; the rollouts branch adds 0011, and merging rechains this to it.
down_revision: str | None = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provisioning_tokens",
        sa.Column("id", sa.String(length=16), primary_key=True),
        sa.Column("token_hash", sa.String(length=64), nullable=False, unique=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("approval", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "pending_joins",
        sa.Column("device_id", sa.String(length=64), primary_key=True),
        sa.Column("token_id", sa.String(length=16), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("mqtt_password_hash", sa.String(length=255), nullable=False),
        sa.Column("rabbitmq_password_hash", sa.String(length=255), nullable=False),
        sa.Column("issued", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rejected", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("public_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("joined_with", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("join_issued", sa.DateTime(timezone=True), nullable=True))
        batch.create_unique_constraint("uq_devices_public_key", ["public_key"])


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_constraint("uq_devices_public_key", type_="unique")
        batch.drop_column("join_issued")
        batch.drop_column("joined_with")
        batch.drop_column("public_key")
    op.drop_table("pending_joins")
    op.drop_table("provisioning_tokens")
