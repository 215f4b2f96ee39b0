"""Credential rotation: the device's credentials generation, a rotation in flight and the new
credentials' verifiers beside the current ones (docs/enrolment.md).

Revision ID: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision: str | None = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(
            sa.Column("credentials_generation", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("credentials_rotated_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rotation_requested", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rotation_issued", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("next_token_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("next_mqtt_password_hash", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("next_rabbitmq_password_hash", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("next_public_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("credentials_key", sa.String(length=64), nullable=True))
        batch.create_index("ix_devices_next_token_hash", ["next_token_hash"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_next_token_hash")
        for column in (
            "credentials_key", "next_public_key", "next_rabbitmq_password_hash", "next_mqtt_password_hash",
            "next_token_hash", "rotation_issued", "rotation_requested", "credentials_rotated_at",
            "credentials_generation",
        ):  # fmt: skip
            batch.drop_column(column)
