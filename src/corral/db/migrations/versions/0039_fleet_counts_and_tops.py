"""fleet health without per-device reads: the devices per product and firmware version as
of the once-a-minute sample, and per product and day the devices with the most disconnects
and failed calls (bench B16: at 1,000,000 devices the summary counted the product's
devices and grouped ~300,000 per-device days per request)

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-05 19:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0039'
down_revision = '0038'
branch_labels = None
depends_on = None

TIME = corral.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'fleet_device_counts',
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('firmware_version', sa.Integer(), nullable=False),
        sa.Column('devices', sa.Integer(), nullable=False),
        sa.Column('online', sa.Integer(), nullable=False),
        sa.Column('sampled_at', TIME, nullable=False),
        sa.PrimaryKeyConstraint('product_id', 'firmware_version',
                                name=op.f('pk_fleet_device_counts')),
    )
    op.create_table(
        'fleet_troubled_days',
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('day', TIME, nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('computed_version', sa.Integer(), nullable=False),
        sa.Column('rest_disconnects', sa.Integer(), nullable=False),
        sa.Column('rest_errors', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('product_id', 'day', name=op.f('pk_fleet_troubled_days')),
    )
    op.create_index('ix_fleet_troubled_days_day', 'fleet_troubled_days', ['day'])
    op.create_table(
        'fleet_day_tops',
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('day', TIME, nullable=False),
        sa.Column('kind', sa.String(length=12), nullable=False),
        sa.Column('device_id', sa.String(length=24), nullable=False),
        sa.Column('n', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('product_id', 'day', 'kind', 'device_id',
                                name=op.f('pk_fleet_day_tops')),
    )
    op.create_index('ix_fleet_day_tops_day', 'fleet_day_tops', ['day'])
    # the days stored so far have no lists yet: the minute singleton makes them
    op.execute("INSERT INTO fleet_troubled_days (product_id, day, version, computed_version, "
               "rest_disconnects, rest_errors) SELECT DISTINCT product_id, day, 1, 0, 0, 0 "
               "FROM fleet_device_days")


def downgrade() -> None:
    op.drop_index('ix_fleet_day_tops_day', table_name='fleet_day_tops')
    op.drop_table('fleet_day_tops')
    op.drop_index('ix_fleet_troubled_days_day', table_name='fleet_troubled_days')
    op.drop_table('fleet_troubled_days')
    op.drop_table('fleet_device_counts')
