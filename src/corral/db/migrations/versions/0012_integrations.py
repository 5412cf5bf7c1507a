"""integrations: webhooks and MQTT forwarding, their outbox, deliveries and delivery log

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-22 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
TIME = corral.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'integrations',
        sa.Column('id', sa.String(length=24), nullable=False),
        sa.Column('owner_user_id', sa.Integer(), nullable=True),
        sa.Column('product_id', sa.Integer(), nullable=True),
        sa.Column('org_id', sa.Integer(), nullable=True),
        sa.Column('integration_type', sa.String(length=32), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=True),
        sa.Column('event', sa.String(length=64), nullable=False),
        sa.Column('device_id', sa.String(length=24), nullable=True),
        sa.Column('settings', sa.JSON(), nullable=False),
        sa.Column('signing_secret', sa.String(length=100), nullable=False),
        sa.Column('disabled', sa.Boolean(), nullable=False),
        sa.Column('disabled_reason', sa.String(length=300), nullable=True),
        sa.Column('disabled_at', TIME, nullable=True),
        sa.Column('created_by', sa.Integer(), nullable=True),
        sa.Column('consecutive_failures', sa.Integer(), nullable=False),
        sa.Column('failing_since', TIME, nullable=True),
        sa.Column('last_success_at', TIME, nullable=True),
        sa.Column('last_failure_at', TIME, nullable=True),
        sa.Column('created_at', TIME, nullable=False),
        sa.Column('updated_at', TIME, nullable=False),
        sa.ForeignKeyConstraint(['owner_user_id'], ['users.id'], ondelete='CASCADE',
                                name=op.f('fk_integrations_owner_user_id_users')),
        sa.ForeignKeyConstraint(['product_id'], ['products.id'], ondelete='CASCADE',
                                name=op.f('fk_integrations_product_id_products')),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ondelete='CASCADE',
                                name=op.f('fk_integrations_org_id_organizations')),
        sa.ForeignKeyConstraint(['created_by'], ['users.id'], ondelete='SET NULL',
                                name=op.f('fk_integrations_created_by_users')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_integrations')),
    )
    op.create_index('ix_integrations_owner', 'integrations', ['owner_user_id'])
    op.create_index('ix_integrations_product', 'integrations', ['product_id'])
    op.create_index('ix_integrations_org', 'integrations', ['org_id'])

    op.create_table(
        'integration_outbox',
        sa.Column('id', ID, autoincrement=True, nullable=False),
        sa.Column('first_event_id', sa.BigInteger(), nullable=False),
        sa.Column('last_event_id', sa.BigInteger(), nullable=False),
        sa.Column('created_at', TIME, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_integration_outbox')),
    )

    op.create_table(
        'integration_deliveries',
        sa.Column('id', ID, autoincrement=True, nullable=False),
        sa.Column('integration_id', sa.String(length=24), nullable=False),
        sa.Column('event_id', sa.BigInteger(), nullable=False),
        sa.Column('product_id', sa.Integer(), nullable=True),
        sa.Column('device_id', sa.String(length=24), nullable=True),
        sa.Column('status', sa.String(length=10), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', TIME, nullable=False),
        sa.Column('created_at', TIME, nullable=False),
        sa.Column('finished_at', TIME, nullable=True),
        sa.Column('last_status_code', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(['integration_id'], ['integrations.id'], ondelete='CASCADE',
                                name=op.f('fk_integration_deliveries_integration_id_integrations')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_integration_deliveries')),
        sa.UniqueConstraint('integration_id', 'event_id', name='uq_integration_deliveries_event'),
    )
    op.create_index('ix_integration_deliveries_due', 'integration_deliveries',
                    ['integration_id', 'status', 'next_attempt_at'])
    op.create_index('ix_integration_deliveries_pending', 'integration_deliveries',
                    ['status', 'integration_id'])
    op.create_index('ix_integration_deliveries_product_done', 'integration_deliveries',
                    ['product_id', 'finished_at'])
    op.create_index('ix_integration_deliveries_done', 'integration_deliveries',
                    ['integration_id', 'finished_at'])
    op.create_index('ix_integration_deliveries_created', 'integration_deliveries',
                    ['created_at'])

    op.create_table(
        'integration_attempts',
        sa.Column('id', ID, autoincrement=True, nullable=False),
        sa.Column('integration_id', sa.String(length=24), nullable=False),
        sa.Column('delivery_id', sa.BigInteger(), nullable=True),
        sa.Column('event_id', sa.BigInteger(), nullable=True),
        sa.Column('at', TIME, nullable=False),
        sa.Column('outcome', sa.String(length=10), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('latency_ms', sa.Integer(), nullable=True),
        sa.Column('request', sa.Text(), nullable=True),
        sa.Column('response', sa.Text(), nullable=True),
        sa.Column('error', sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(['integration_id'], ['integrations.id'], ondelete='CASCADE',
                                name=op.f('fk_integration_attempts_integration_id_integrations')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_integration_attempts')),
    )
    op.create_index('ix_integration_attempts_integration', 'integration_attempts',
                    ['integration_id', 'id'])


def downgrade() -> None:
    op.drop_index('ix_integration_attempts_integration', table_name='integration_attempts')
    op.drop_table('integration_attempts')
    for name in ('created', 'done', 'product_done', 'pending', 'due'):
        op.drop_index(f'ix_integration_deliveries_{name}', table_name='integration_deliveries')
    op.drop_table('integration_deliveries')
    op.drop_table('integration_outbox')
    for name in ('org', 'product', 'owner'):
        op.drop_index(f'ix_integrations_{name}', table_name='integrations')
    op.drop_table('integrations')
