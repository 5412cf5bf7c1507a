"""DTLS sessions of Gen 3 Particle devices, kept for resumption across restarts

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 03:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from corral.db.base import UTCDateTime

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'particle_udp_sessions',
        sa.Column('cid', sa.String(16), nullable=False),
        sa.Column('device_id', sa.String(24), nullable=False),
        sa.Column('state', sa.JSON(), nullable=False),
        sa.Column('updated_at', UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('cid', name='pk_particle_udp_sessions'),
    )
    op.create_index('ix_particle_udp_sessions_device_id', 'particle_udp_sessions',
                    ['device_id'])


def downgrade() -> None:
    op.drop_index('ix_particle_udp_sessions_device_id', table_name='particle_udp_sessions')
    op.drop_table('particle_udp_sessions')
