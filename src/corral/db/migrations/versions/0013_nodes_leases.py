"""node registry, leases of singleton work, the node holding each device's session

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-22 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from corral.db.base import UTCDateTime

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'nodes',
        sa.Column('id', sa.String(40), nullable=False),
        sa.Column('role', sa.String(16), nullable=False),
        sa.Column('host', sa.String(255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('version', sa.String(32), nullable=False),
        sa.Column('started_at', UTCDateTime(), nullable=False),
        sa.Column('heartbeat_at', UTCDateTime(), nullable=False),
        sa.Column('sessions', sa.Integer(), nullable=False),
        sa.Column('stopped_at', UTCDateTime(), nullable=True),
        sa.Column('stop_reason', sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint('id', name='pk_nodes'),
    )
    op.create_table(
        'leases',
        sa.Column('name', sa.String(64), nullable=False),
        sa.Column('holder', sa.String(40), nullable=False),
        sa.Column('acquired_at', UTCDateTime(), nullable=False),
        sa.Column('expires_at', UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name', name='pk_leases'),
    )
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('node_id', sa.String(40), nullable=True))
    op.create_index('ix_devices_node_online', 'devices', ['node_id'],
                    sqlite_where=sa.text('online'), postgresql_where=sa.text('online'))


def downgrade() -> None:
    op.drop_index('ix_devices_node_online', table_name='devices')
    with op.batch_alter_table('devices') as batch:
        batch.drop_column('node_id')
    op.drop_table('leases')
    op.drop_table('nodes')
