"""Indexes for the dashboard's fleet views at thousands of devices: a device's and a service's
newest events, and active devices by online status.

Revision ID: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_events_device_id_id", "events", ["device_id", "id"])
    op.create_index("ix_events_service_id", "events", ["service", "id"])
    op.create_index("ix_devices_revoked_online", "devices", ["revoked", "online"])


def downgrade() -> None:
    op.drop_index("ix_devices_revoked_online", table_name="devices")
    op.drop_index("ix_events_service_id", table_name="events")
    op.drop_index("ix_events_device_id_id", table_name="events")
