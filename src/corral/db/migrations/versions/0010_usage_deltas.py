"""usage deltas: append-only usage rows that the metering tick folds into usage_counters

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-21 14:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
COUNT = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
COUNTERS = ('events_published', 'events_delivered', 'function_calls', 'variable_reads',
            'events_discarded', 'data_operations', 'data_operations_kb', 'payload_bytes',
            'location_points', 'cellular_bytes')


def upgrade() -> None:
    op.create_table(
        'usage_deltas',
        sa.Column('id', ID, autoincrement=True, nullable=False),
        sa.Column('device_id', sa.String(length=24), nullable=False),
        sa.Column('period', sa.Date(), nullable=False),
        sa.Column('product_id', sa.Integer(), nullable=True),
        sa.Column('org_id', sa.Integer(), nullable=True),
        sa.Column('owner_user_id', sa.Integer(), nullable=True),
        *(sa.Column(c, COUNT, server_default='0', nullable=False) for c in COUNTERS),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_deltas')),
    )


def downgrade() -> None:
    # fold what is not folded yet first (ON CONFLICT ... DO UPDATE reads the same on SQLite
    # and PostgreSQL; a moved device's counter row may keep an older tenancy here)
    sums = ', '.join(f'sum({c})' for c in COUNTERS)
    adds = ', '.join(f'{c} = usage_counters.{c} + excluded.{c}' for c in COUNTERS)
    op.execute(
        f"INSERT INTO usage_counters (device_id, period, product_id, org_id, owner_user_id, "
        f"updated_at, {', '.join(COUNTERS)}) "
        f"SELECT device_id, period, max(product_id), max(org_id), max(owner_user_id), "
        f"CURRENT_TIMESTAMP, {sums} FROM usage_deltas WHERE true GROUP BY device_id, period "
        f"ON CONFLICT (device_id, period) DO UPDATE SET {adds}")
    op.drop_table('usage_deltas')
