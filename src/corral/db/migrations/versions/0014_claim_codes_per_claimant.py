"""claim codes are unique per claimant, not globally

An ICCID or IMEI claim code may be pending for several claimants at once (one row each), so
one tenant cannot squat another tenant's device ICCID; the device's owner decides on
redemption.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def _where(cond: str) -> dict[str, object]:
    return {"sqlite_where": sa.text(cond), "postgresql_where": sa.text(cond)}


def upgrade() -> None:
    with op.batch_alter_table('claim_codes', schema=None) as batch_op:
        batch_op.drop_constraint('uq_claim_codes_code_hash', type_='unique')
        batch_op.create_index('ix_claim_codes_code_hash', ['code_hash'], unique=False)
        batch_op.create_index('uq_claim_codes_user_code', ['code_hash', 'user_id'], unique=True,
                              **_where("user_id IS NOT NULL"))
        batch_op.create_index('uq_claim_codes_customer_code', ['code_hash', 'customer_id'],
                              unique=True, **_where("customer_id IS NOT NULL"))


def downgrade() -> None:
    # one row per code again: keep the newest holder of each code
    op.execute("DELETE FROM claim_codes WHERE id NOT IN "
               "(SELECT MAX(id) FROM claim_codes GROUP BY code_hash)")
    with op.batch_alter_table('claim_codes', schema=None) as batch_op:
        batch_op.drop_index('uq_claim_codes_customer_code')
        batch_op.drop_index('uq_claim_codes_user_code')
        batch_op.drop_index('ix_claim_codes_code_hash')
        batch_op.create_unique_constraint('uq_claim_codes_code_hash', ['code_hash'])
