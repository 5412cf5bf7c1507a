"""fleet health: disconnects per product, hour and reason

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-05 04:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'fleet_disconnects',
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('bucket', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('reason', sa.String(length=64), nullable=False),
        sa.Column('count', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('product_id', 'bucket', 'reason',
                                name=op.f('pk_fleet_disconnects')),
    )
    op.create_index('ix_fleet_disconnects_bucket', 'fleet_disconnects', ['bucket'])


def downgrade() -> None:
    op.drop_index('ix_fleet_disconnects_bucket', table_name='fleet_disconnects')
    op.drop_table('fleet_disconnects')
