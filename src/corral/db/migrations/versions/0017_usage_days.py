"""usage_days: an organization's month-to-date usage at the end of each day (the console's
per-day usage chart)

Revision ID: 0017
Revises: 0015
Create Date: 2026-12-05 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0015'
branch_labels = None
depends_on = None

COUNT = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'usage_days',
        sa.Column('org_id', sa.Integer(), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('data_operations', COUNT, nullable=False),
        sa.Column('data_operations_kb', COUNT, nullable=False),
        sa.Column('cellular_bytes', COUNT, nullable=False),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'],
                                name='fk_usage_days_org_id_organizations',
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('org_id', 'day', name='pk_usage_days'),
    )


def downgrade() -> None:
    op.drop_table('usage_days')
