"""fleet health filtered by device group or Device OS version: disconnects per product,
segment, hour and reason

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-05 10:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0031'
down_revision = '0030'
branch_labels = None
depends_on = None

TIME = corral.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'fleet_segment_disconnects',
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('segment', sa.String(length=40), nullable=False),
        sa.Column('bucket', TIME, nullable=False),
        sa.Column('reason', sa.String(length=64), nullable=False),
        sa.Column('count', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('product_id', 'segment', 'bucket', 'reason',
                                name=op.f('pk_fleet_segment_disconnects')),
    )
    op.create_index('ix_fleet_segment_disconnects_bucket', 'fleet_segment_disconnects',
                    ['bucket'])


def downgrade() -> None:
    op.drop_index('ix_fleet_segment_disconnects_bucket', table_name='fleet_segment_disconnects')
    op.drop_table('fleet_segment_disconnects')
