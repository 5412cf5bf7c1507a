"""fleet health filtered by a static device group or a Device OS version reads the devices
per segment and firmware version as of the once-a-minute sample (bench B16: a group of
100,000 devices in a fleet of 1,000,000 was counted per request, ~280 ms of CPU)

Revision ID: 0040
Revises: 0039
Create Date: 2026-12-05 20:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0040'
down_revision = '0039'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'fleet_segment_device_counts',
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('segment', sa.String(length=40), nullable=False),
        sa.Column('firmware_version', sa.Integer(), nullable=False),
        sa.Column('devices', sa.Integer(), nullable=False),
        sa.Column('online', sa.Integer(), nullable=False),
        sa.Column('sampled_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('product_id', 'segment', 'firmware_version',
                                name=op.f('pk_fleet_segment_device_counts')),
    )


def downgrade() -> None:
    op.drop_table('fleet_segment_device_counts')
