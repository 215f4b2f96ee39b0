"""Each device's broker password also as RabbitMQ's own hash, for the management API.

The hub never keeps a password, only hashes; RabbitMQ cannot check Mosquitto's ``$7$`` one,
so enrolment now stores both. Devices enrolled before this revision have none: a RabbitMQ
broker leaves them out until they are enrolled again (see docs/scale-out.md).

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("rabbitmq_password_hash", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("rabbitmq_password_hash")
