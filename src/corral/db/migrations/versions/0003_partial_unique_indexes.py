"""integrity and listing indexes

One org-scope membership per user and org; one pending invitation per address and scope;
device sort indexes carry the id tie-breaker (deep pages straight from the index).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ORG_SCOPE = "product_id IS NULL"
PENDING_ORG = "product_id IS NULL AND status = 'pending'"
PENDING_PRODUCT = "product_id IS NOT NULL AND status = 'pending'"


def _where(cond: str) -> dict[str, object]:
    return {"sqlite_where": sa.text(cond), "postgresql_where": sa.text(cond)}


SORT_INDEXES = {
    "ix_devices_product_last_heard": "last_heard",
    "ix_devices_product_fw": "firmware_version",
    "ix_devices_product_name": "name",
}


def upgrade() -> None:
    for name, column in SORT_INDEXES.items():
        op.drop_index(name, table_name="devices")
        op.create_index(name, "devices", ["product_id", column, "id"])
    op.create_index("uq_memberships_org_scope", "memberships", ["user_id", "org_id"],
                    unique=True, **_where(ORG_SCOPE))
    op.create_index("uq_invitations_pending_org", "invitations", ["org_id", "email"],
                    unique=True, **_where(PENDING_ORG))
    op.create_index("uq_invitations_pending_product", "invitations", ["product_id", "email"],
                    unique=True, **_where(PENDING_PRODUCT))


def downgrade() -> None:
    op.drop_index("uq_invitations_pending_product", table_name="invitations")
    op.drop_index("uq_invitations_pending_org", table_name="invitations")
    op.drop_index("uq_memberships_org_scope", table_name="memberships")
    for name, column in SORT_INDEXES.items():
        op.drop_index(name, table_name="devices")
        op.create_index(name, "devices", ["product_id", column])
