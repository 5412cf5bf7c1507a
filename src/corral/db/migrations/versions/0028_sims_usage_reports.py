"""SIM cards (sims), a SIM's cellular data per day (sim_usage_days) and asynchronous usage
reports (usage_reports); existing device ICCIDs become SIMs of the device's product or owner

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-05 06:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None

COUNT = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
TIME = corral.db.base.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        'sims',
        sa.Column('iccid', sa.String(length=32), nullable=False),
        sa.Column('product_id', sa.Integer(), nullable=True),
        sa.Column('owner_user_id', sa.Integer(), nullable=True),
        sa.Column('last_device_id', sa.String(length=24), nullable=True),
        sa.Column('activations_count', sa.Integer(), nullable=False),
        sa.Column('deactivated_at', TIME, nullable=True),
        sa.Column('created_at', TIME, nullable=False),
        sa.Column('updated_at', TIME, nullable=False),
        sa.ForeignKeyConstraint(['product_id'], ['products.id'],
                                name='fk_sims_product_id_products', ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['owner_user_id'], ['users.id'],
                                name='fk_sims_owner_user_id_users', ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('iccid', name='pk_sims'),
    )
    op.create_index('ix_sims_product_id', 'sims', ['product_id', 'iccid'])
    op.create_index('ix_sims_owner_user_id', 'sims', ['owner_user_id', 'iccid'])
    op.create_table(
        'sim_usage_days',
        sa.Column('iccid', sa.String(length=32), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('cellular_bytes', COUNT, nullable=False),
        sa.PrimaryKeyConstraint('iccid', 'day', name='pk_sim_usage_days'),
    )
    op.create_table(
        'usage_reports',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('org_id', sa.Integer(), nullable=False),
        sa.Column('requested_by', sa.Integer(), nullable=True),
        sa.Column('report_type', sa.String(length=16), nullable=False),
        sa.Column('date_period_start', sa.Date(), nullable=False),
        sa.Column('date_period_end', sa.Date(), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('csv', sa.Text(), nullable=True),
        sa.Column('error', sa.String(length=200), nullable=True),
        sa.Column('created_at', TIME, nullable=False),
        sa.Column('expires_at', TIME, nullable=False),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'],
                                name='fk_usage_reports_org_id_organizations',
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['requested_by'], ['users.id'],
                                name='fk_usage_reports_requested_by_users',
                                ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name='pk_usage_reports'),
    )
    op.create_index('ix_usage_reports_state', 'usage_reports', ['state', 'id'])
    op.create_index('ix_usage_reports_org_id', 'usage_reports', ['org_id'])
    # the ICCIDs devices already carry become SIMs of the device's product (or owner); a
    # SIM whose deactivation interval is open stays deactivated
    op.execute(
        "INSERT INTO sims (iccid, product_id, owner_user_id, last_device_id, "
        "activations_count, deactivated_at, created_at, updated_at) "
        "SELECT d.iccid, d.product_id, CASE WHEN d.product_id IS NULL THEN d.owner_user_id END, "
        "d.id, 1, (SELECT max(s.deactivated_at) FROM sim_deactivations s "
        "WHERE s.iccid = d.iccid AND s.reactivated_at IS NULL), d.created_at, d.created_at "
        "FROM devices d WHERE d.iccid IS NOT NULL AND d.id = (SELECT min(e.id) FROM devices e "
        "WHERE e.iccid = d.iccid)")


def downgrade() -> None:
    op.drop_index('ix_usage_reports_org_id', table_name='usage_reports')
    op.drop_index('ix_usage_reports_state', table_name='usage_reports')
    op.drop_table('usage_reports')
    op.drop_table('sim_usage_days')
    op.drop_index('ix_sims_owner_user_id', table_name='sims')
    op.drop_index('ix_sims_product_id', table_name='sims')
    op.drop_table('sims')
