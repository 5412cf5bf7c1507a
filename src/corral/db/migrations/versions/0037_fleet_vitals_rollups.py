"""fleet vitals rollups: per product (or segment), minute or hour, firmware version, vital
and histogram bin, the count and the lowest and highest value (the fleet's vitals median
and worst over every report, not a sample)

Revision ID: 0037
Revises: 0036
Create Date: 2026-12-05 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0037'
down_revision = '0036'
branch_labels = None
depends_on = None

TIME = corral.db.base.UTCDateTime(timezone=True)
TABLES = ('fleet_vitals_minutes', 'fleet_vitals_hours')


def upgrade() -> None:
    for table in TABLES:
        op.create_table(
            table,
            sa.Column('product_id', sa.Integer(), nullable=False),
            sa.Column('segment', sa.String(length=40), nullable=False),
            sa.Column('bucket', TIME, nullable=False),
            sa.Column('firmware_version', sa.Integer(), nullable=False),
            sa.Column('vital', sa.String(length=16), nullable=False),
            sa.Column('bin', sa.Integer(), nullable=False),
            sa.Column('count', sa.Integer(), nullable=False),
            sa.Column('low', sa.Float(), nullable=False),
            sa.Column('high', sa.Float(), nullable=False),
            sa.PrimaryKeyConstraint('product_id', 'segment', 'vital', 'bucket',
                                    'firmware_version', 'bin', name=op.f(f'pk_{table}')),
        )
        op.create_index(f'ix_{table}_bucket', table, ['bucket'])


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_index(f'ix_{table}_bucket', table_name=table)
        op.drop_table(table)
