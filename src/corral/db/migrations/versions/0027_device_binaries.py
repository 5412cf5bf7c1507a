"""device binaries: a binary flashed to one device (PUT /v1/devices/:id with a file)

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-05 06:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'device_binaries',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('filename', sa.String(length=200), nullable=False),
        sa.Column('platform_id', sa.Integer(), nullable=True),
        sa.Column('product_version', sa.Integer(), nullable=True),
        sa.Column('module', sa.JSON(), nullable=True),
        sa.Column('created_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('last_flashed_at', corral.db.base.UTCDateTime(timezone=True),
                  nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_device_binaries')),
        sa.UniqueConstraint('sha256', name=op.f('uq_device_binaries_sha256')),
    )
    op.create_index(op.f('ix_device_binaries_last_flashed_at'), 'device_binaries',
                    ['last_flashed_at'])
    with op.batch_alter_table('device_updates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('binary_id', sa.Integer(), nullable=True))
        batch_op.alter_column('product_id', existing_type=sa.Integer(), nullable=True)
        batch_op.alter_column('firmware_id', existing_type=sa.Integer(), nullable=True)
        batch_op.create_foreign_key(
            batch_op.f('fk_device_updates_binary_id_device_binaries'), 'device_binaries',
            ['binary_id'], ['id'], ondelete='SET NULL')
        batch_op.create_index(batch_op.f('ix_device_updates_binary_id'), ['binary_id'])


def downgrade() -> None:
    op.execute("DELETE FROM device_updates WHERE firmware_id IS NULL OR product_id IS NULL")
    with op.batch_alter_table('device_updates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_updates_binary_id'))
        batch_op.drop_constraint(batch_op.f('fk_device_updates_binary_id_device_binaries'),
                                 type_='foreignkey')
        batch_op.alter_column('firmware_id', existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column('product_id', existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column('binary_id')
    op.drop_index(op.f('ix_device_binaries_last_flashed_at'), table_name='device_binaries')
    op.drop_table('device_binaries')
