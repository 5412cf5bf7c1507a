"""location points (stored `loc` events)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-21 12:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table(
        'location_points',
        sa.Column('id', ID, autoincrement=True, nullable=False),
        sa.Column('device_id', sa.String(length=24), nullable=False),
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('org_id', sa.Integer(), nullable=True),
        sa.Column('event_id', ID, nullable=False),
        sa.Column('at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('lat', sa.Float(), nullable=False),
        sa.Column('lon', sa.Float(), nullable=False),
        sa.Column('alt', sa.Float(), nullable=True),
        sa.Column('accuracy_m', sa.Float(), nullable=True),
        sa.Column('heading', sa.Float(), nullable=True),
        sa.Column('speed', sa.Float(), nullable=True),
        sa.Column('gps_lock', sa.Boolean(), nullable=False),
        sa.Column('stored_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_location_points')),
        sa.UniqueConstraint('event_id', name=op.f('uq_location_points_event_id')),
    )
    op.create_index('ix_location_points_device_at', 'location_points', ['device_id', 'at'])
    op.create_index('ix_location_points_product_at', 'location_points', ['product_id', 'at'])


def downgrade() -> None:
    op.drop_index('ix_location_points_product_at', table_name='location_points')
    op.drop_index('ix_location_points_device_at', table_name='location_points')
    op.drop_table('location_points')
