"""fleet health filtered by device group and by Device OS version: the per-minute and hourly
rollups again per segment of a product's devices (``g:<group id>``, ``os:<version>``), and
an index of a product's devices by Device OS version

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-05 10:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0030'
down_revision = '0029'
branch_labels = None
depends_on = None

TIME = corral.db.base.UTCDateTime(timezone=True)
COUNTERS = ('online', 'events', 'connects', 'disconnects', 'fn_success', 'fn_failure',
            'fn_offline', 'var_success', 'var_failure', 'var_offline')
TABLES = ('fleet_segment_minutes', 'fleet_segment_hours')


def upgrade() -> None:
    for table in TABLES:
        op.create_table(
            table,
            sa.Column('product_id', sa.Integer(), nullable=False),
            sa.Column('segment', sa.String(length=40), nullable=False),
            sa.Column('bucket', TIME, nullable=False),
            sa.Column('firmware_version', sa.Integer(), nullable=False),
            *[sa.Column(c, sa.Integer(), nullable=False) for c in COUNTERS],
            sa.PrimaryKeyConstraint('product_id', 'segment', 'bucket', 'firmware_version',
                                    name=op.f(f'pk_{table}')),
        )
        op.create_index(f'ix_{table}_bucket', table, ['bucket'])
    op.create_index('ix_devices_product_os', 'devices',
                    ['product_id', 'system_firmware_version', 'firmware_version', 'id'])


def downgrade() -> None:
    op.drop_index('ix_devices_product_os', table_name='devices')
    for table in reversed(TABLES):
        op.drop_index(f'ix_{table}_bucket', table_name=table)
        op.drop_table(table)
