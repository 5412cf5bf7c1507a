"""what each device was sent and has applied of each cloud-to-device ledger

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-05 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0035'
down_revision = '0034'
branch_labels = None
depends_on = None

TIME = corral.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'ledger_device_states',
        sa.Column('device_id', sa.String(length=24), nullable=False),
        sa.Column('ledger_id', sa.Integer(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('source', sa.String(length=64), nullable=False),
        sa.Column('sent_at', TIME, nullable=True),
        sa.Column('applied_version', sa.Integer(), nullable=True),
        sa.Column('applied_at', TIME, nullable=True),
        sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE',
                                name=op.f('fk_ledger_device_states_device_id_devices')),
        sa.ForeignKeyConstraint(['ledger_id'], ['ledger_definitions.id'], ondelete='CASCADE',
                                name=op.f('fk_ledger_device_states_ledger_id_ledger_definitions')),
        sa.PrimaryKeyConstraint('device_id', 'ledger_id', name=op.f('pk_ledger_device_states')),
    )
    op.create_index('ix_ledger_device_states_ledger', 'ledger_device_states',
                    ['ledger_id', 'applied_version'])


def downgrade() -> None:
    op.drop_index('ix_ledger_device_states_ledger', table_name='ledger_device_states')
    op.drop_table('ledger_device_states')
