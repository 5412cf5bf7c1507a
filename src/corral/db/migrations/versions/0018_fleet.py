"""fleet health: device vitals, per-minute and hourly rollups, per-device days, alert rules

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 03:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
TIME = corral.db.base.UTCDateTime(timezone=True)
COUNTERS = ('online', 'events', 'connects', 'disconnects', 'fn_success', 'fn_failure',
            'fn_offline', 'var_success', 'var_failure', 'var_offline')


def upgrade() -> None:
    op.create_table(
        'device_vitals',
        sa.Column('id', ID, autoincrement=True, nullable=False),
        sa.Column('device_id', sa.String(length=24), nullable=False),
        sa.Column('product_id', sa.Integer(), nullable=True),
        sa.Column('org_id', sa.Integer(), nullable=True),
        sa.Column('event_id', ID, nullable=False),
        sa.Column('at', TIME, nullable=False),
        sa.Column('payload', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_device_vitals')),
        sa.UniqueConstraint('event_id', name=op.f('uq_device_vitals_event_id')),
    )
    op.create_index('ix_device_vitals_device_at', 'device_vitals', ['device_id', 'at'])
    op.create_index('ix_device_vitals_at', 'device_vitals', ['at'])
    for table in ('fleet_minutes', 'fleet_hours'):
        op.create_table(
            table,
            sa.Column('product_id', sa.Integer(), nullable=False),
            sa.Column('bucket', TIME, nullable=False),
            sa.Column('firmware_version', sa.Integer(), nullable=False),
            *[sa.Column(c, sa.Integer(), nullable=False) for c in COUNTERS],
            sa.PrimaryKeyConstraint('product_id', 'bucket', 'firmware_version',
                                    name=op.f(f'pk_{table}')),
        )
        op.create_index(f'ix_{table}_bucket', table, ['bucket'])
    op.create_table(
        'fleet_device_days',
        sa.Column('device_id', sa.String(length=24), nullable=False),
        sa.Column('day', TIME, nullable=False),
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('disconnects', sa.Integer(), nullable=False),
        sa.Column('errors', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('device_id', 'day', name=op.f('pk_fleet_device_days')),
    )
    op.create_index('ix_fleet_device_days_product_day', 'fleet_device_days',
                    ['product_id', 'day'])
    op.create_index('ix_fleet_device_days_day', 'fleet_device_days', ['day'])
    op.create_table(
        'fleet_alert_rules',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('threshold', sa.Float(), nullable=False),
        sa.Column('window_s', sa.Integer(), nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('active', sa.Boolean(), nullable=False),
        sa.Column('active_since', TIME, nullable=True),
        sa.Column('last_value', sa.Float(), nullable=True),
        sa.Column('subject', sa.JSON(), nullable=True),
        sa.Column('created_at', TIME, nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_fleet_alert_rules')),
    )
    op.create_index('ix_fleet_alert_rules_product', 'fleet_alert_rules', ['product_id'])


def downgrade() -> None:
    op.drop_index('ix_fleet_alert_rules_product', table_name='fleet_alert_rules')
    op.drop_table('fleet_alert_rules')
    op.drop_index('ix_fleet_device_days_day', table_name='fleet_device_days')
    op.drop_index('ix_fleet_device_days_product_day', table_name='fleet_device_days')
    op.drop_table('fleet_device_days')
    for table in ('fleet_hours', 'fleet_minutes'):
        op.drop_index(f'ix_{table}_bucket', table_name=table)
        op.drop_table(table)
    op.drop_index('ix_device_vitals_at', table_name='device_vitals')
    op.drop_index('ix_device_vitals_device_at', table_name='device_vitals')
    op.drop_table('device_vitals')
