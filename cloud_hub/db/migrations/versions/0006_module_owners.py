"""Module names belong to publishers: the keys allowed to sign each module name.

An existing registry gets, for each module name, the signers of its first version (the lowest
id: the first push) as owners; every other key then needs an admin's grant. Stored desired
states are left as they are (their bytes are signed): each device gets the keys with its next
state, and until then runs what its publisher keys allow, as before.

Revision ID: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    signers = op.create_table(
        "module_signers",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("keyid", sa.String(length=64), primary_key=True),
        sa.Column("role", sa.String(length=8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    modules = sa.table(
        "modules",
        sa.column("id", sa.Integer()),
        sa.column("name", sa.String()),
        sa.column("signers", sa.JSON()),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    bind = op.get_bind()
    first = sa.select(sa.func.min(modules.c.id)).group_by(modules.c.name)
    rows = bind.execute(
        sa.select(modules.c.name, modules.c.signers, modules.c.created_at).where(modules.c.id.in_(first))
    )
    # As a first push does (cloud_hub.registry.owners): its distinct signers, at most
    # MAX_MODULE_SIGNERS (16) of them, so every desired state naming them stays valid.
    owners = [
        {"name": name, "keyid": keyid, "role": "owner", "created_at": created_at}
        for name, keys, created_at in rows
        for keyid in sorted(set(keys or []))[:16]
    ]
    if owners:
        op.bulk_insert(signers, owners)


def downgrade() -> None:
    op.drop_table("module_signers")
