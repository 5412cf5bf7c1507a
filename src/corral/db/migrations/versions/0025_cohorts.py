"""cohorts: a product's exclusive device segments, each optionally with a release

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-05 06:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'cohorts',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('description', sa.String(length=500), nullable=True),
        sa.Column('firmware_id', sa.Integer(), nullable=True),
        sa.Column('created_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['product_id'], ['products.id'], ondelete='CASCADE',
                                name=op.f('fk_cohorts_product_id_products')),
        sa.ForeignKeyConstraint(['firmware_id'], ['product_firmware.id'], ondelete='SET NULL',
                                name=op.f('fk_cohorts_firmware_id_product_firmware')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_cohorts')),
        sa.UniqueConstraint('product_id', 'name', name='uq_cohorts_product_name'),
    )
    op.create_index(op.f('ix_cohorts_firmware_id'), 'cohorts', ['firmware_id'])
    op.create_table(
        'cohort_members',
        sa.Column('device_id', sa.String(length=24), nullable=False),
        sa.Column('cohort_id', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE',
                                name=op.f('fk_cohort_members_device_id_devices')),
        sa.ForeignKeyConstraint(['cohort_id'], ['cohorts.id'], ondelete='CASCADE',
                                name=op.f('fk_cohort_members_cohort_id_cohorts')),
        sa.PrimaryKeyConstraint('device_id', name=op.f('pk_cohort_members')),
    )
    op.create_index('ix_cohort_members_cohort_device', 'cohort_members',
                    ['cohort_id', 'device_id'])


def downgrade() -> None:
    op.drop_index('ix_cohort_members_cohort_device', table_name='cohort_members')
    op.drop_table('cohort_members')
    op.drop_index(op.f('ix_cohorts_firmware_id'), table_name='cohorts')
    op.drop_table('cohorts')
