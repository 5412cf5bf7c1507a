"""metering plans allowances warnings

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

COUNT = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')

# The plan terms (Particle's published Free and Basic tiers; Enterprise maximums are per
# contract, in org_plans). Frozen here as of this revision; corral.metering.plans has the
# same values to refill an emptied table.
PLANS = [
    {"code": "free", "name": "Free", "period": "month", "max_devices": 100,
     "max_data_ops": 100_000, "max_cellular_mb": 100, "max_storage_mb": None,
     "block_devices": 0, "block_data_ops": 0, "block_cellular_mb": 0,
     "block_price_cents": 0, "min_blocks": 0, "pause_at_limit": True, "per_kb": False,
     "self_service": True, "position": 1},
    {"code": "basic", "name": "Basic", "period": "month", "max_devices": 0,
     "max_data_ops": 0, "max_cellular_mb": 0, "max_storage_mb": None,
     "block_devices": 100, "block_data_ops": 720_000, "block_cellular_mb": 540,
     "block_price_cents": 29_900, "min_blocks": 1, "pause_at_limit": False, "per_kb": False,
     "self_service": True, "position": 2},
    {"code": "enterprise", "name": "Enterprise", "period": "year", "max_devices": None,
     "max_data_ops": None, "max_cellular_mb": None, "max_storage_mb": None,
     "block_devices": 0, "block_data_ops": 0, "block_cellular_mb": 0,
     "block_price_cents": 0, "min_blocks": 0, "pause_at_limit": False, "per_kb": False,
     "self_service": False, "position": 3},
]


def upgrade() -> None:
    plans = op.create_table(
        'plans',
        sa.Column('code', sa.String(length=20), nullable=False),
        sa.Column('name', sa.String(length=60), nullable=False),
        sa.Column('period', sa.String(length=8), nullable=False),
        sa.Column('max_devices', sa.Integer(), nullable=True),
        sa.Column('max_data_ops', COUNT, nullable=True),
        sa.Column('max_cellular_mb', sa.Integer(), nullable=True),
        sa.Column('max_storage_mb', sa.Integer(), nullable=True),
        sa.Column('block_devices', sa.Integer(), nullable=False),
        sa.Column('block_data_ops', COUNT, nullable=False),
        sa.Column('block_cellular_mb', sa.Integer(), nullable=False),
        sa.Column('block_price_cents', sa.Integer(), nullable=False),
        sa.Column('min_blocks', sa.Integer(), nullable=False),
        sa.Column('pause_at_limit', sa.Boolean(), nullable=False),
        sa.Column('per_kb', sa.Boolean(), nullable=False),
        sa.Column('self_service', sa.Boolean(), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('code', name=op.f('pk_plans')),
    )
    op.bulk_insert(plans, PLANS)
    op.create_table(
        'org_plans',
        sa.Column('org_id', sa.Integer(), nullable=False),
        sa.Column('plan_code', sa.String(length=20), nullable=False),
        sa.Column('blocks', sa.Integer(), nullable=False),
        sa.Column('max_devices', sa.Integer(), nullable=True),
        sa.Column('max_data_ops', COUNT, nullable=True),
        sa.Column('max_cellular_mb', sa.Integer(), nullable=True),
        sa.Column('max_storage_mb', sa.Integer(), nullable=True),
        sa.Column('contract_start', sa.Date(), nullable=True),
        sa.Column('per_kb', sa.Boolean(), nullable=True),
        sa.Column('pause_at_limit', sa.Boolean(), nullable=True),
        sa.Column('created_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'],
                                name=op.f('fk_org_plans_org_id_organizations'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['plan_code'], ['plans.code'],
                                name=op.f('fk_org_plans_plan_code_plans'), ondelete='RESTRICT'),
        sa.PrimaryKeyConstraint('org_id', name=op.f('pk_org_plans')),
    )
    op.create_table(
        'usage_alerts',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('org_id', sa.Integer(), nullable=False),
        sa.Column('period', sa.Date(), nullable=False),
        sa.Column('metric', sa.String(length=20), nullable=False),
        sa.Column('threshold', sa.Integer(), nullable=False),
        sa.Column('used', COUNT, nullable=False),
        sa.Column('allowance', COUNT, nullable=False),
        sa.Column('created_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'],
                                name=op.f('fk_usage_alerts_org_id_organizations'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_alerts')),
        sa.UniqueConstraint('org_id', 'period', 'metric', 'threshold',
                            name=op.f('uq_usage_alerts_org_id')),
    )
    op.create_table(
        'notifications',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('org_id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=60), nullable=False),
        sa.Column('title', sa.String(length=200), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('details', sa.JSON(), nullable=False),
        sa.Column('created_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('read_at', corral.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'],
                                name=op.f('fk_notifications_org_id_organizations'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_notifications')),
    )
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.create_index('ix_notifications_org_id', ['org_id', 'id'], unique=False)
    op.create_table(
        'sim_deactivations',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('iccid', sa.String(length=32), nullable=False),
        sa.Column('deactivated_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('reactivated_at', corral.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_sim_deactivations')),
    )
    with op.batch_alter_table('sim_deactivations', schema=None) as batch_op:
        batch_op.create_index('ix_sim_deactivations_iccid', ['iccid', 'deactivated_at'],
                              unique=False)
    with op.batch_alter_table('usage_counters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('location_points', COUNT, server_default='0',
                                      nullable=False))
        batch_op.add_column(sa.Column('cellular_bytes', COUNT, server_default='0',
                                      nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('usage_counters', schema=None) as batch_op:
        batch_op.drop_column('cellular_bytes')
        batch_op.drop_column('location_points')
    with op.batch_alter_table('sim_deactivations', schema=None) as batch_op:
        batch_op.drop_index('ix_sim_deactivations_iccid')
    op.drop_table('sim_deactivations')
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index('ix_notifications_org_id')
    op.drop_table('notifications')
    op.drop_table('usage_alerts')
    op.drop_table('org_plans')
    op.drop_table('plans')
