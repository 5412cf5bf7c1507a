"""ledgers: definitions per organization, instances per scope value, every version

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-05 12:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0033'
down_revision = '0032'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'ledger_definitions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('org_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=32), nullable=False),
        sa.Column('description', sa.Text(), nullable=False),
        sa.Column('scope', sa.String(length=8), nullable=False),
        sa.Column('direction', sa.String(length=16), nullable=False),
        sa.Column('json_schema', sa.JSON(), nullable=True),
        sa.Column('archived_at', corral.db.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column('created_by', sa.String(length=254), nullable=True),
        sa.Column('updated_by', sa.String(length=254), nullable=True),
        sa.Column('created_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['org_id'], ['organizations.id'], ondelete='CASCADE',
                                name=op.f('fk_ledger_definitions_org_id_organizations')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_definitions')),
        sa.UniqueConstraint('org_id', 'name', name='uq_ledger_definitions_org_name'),
    )
    op.create_table(
        'ledger_instances',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('ledger_id', sa.Integer(), nullable=False),
        sa.Column('level', sa.String(length=8), nullable=False),
        sa.Column('scope_key', sa.String(length=64), nullable=False),
        sa.Column('data', sa.JSON(), nullable=True),
        sa.Column('size_bytes', sa.Integer(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('updated_by', sa.String(length=254), nullable=True),
        sa.Column('created_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['ledger_id'], ['ledger_definitions.id'], ondelete='CASCADE',
                                name=op.f('fk_ledger_instances_ledger_id_ledger_definitions')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_instances')),
        sa.UniqueConstraint('ledger_id', 'level', 'scope_key',
                            name='uq_ledger_instances_ledger_level_key'),
    )
    op.create_table(
        'ledger_versions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('instance_id', sa.Integer(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('op', sa.String(length=12), nullable=False),
        sa.Column('data', sa.JSON(), nullable=True),
        sa.Column('size_bytes', sa.Integer(), nullable=False),
        sa.Column('restored_from', sa.Integer(), nullable=True),
        sa.Column('created_at', corral.db.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column('created_by', sa.String(length=254), nullable=True),
        sa.ForeignKeyConstraint(['instance_id'], ['ledger_instances.id'], ondelete='CASCADE',
                                name=op.f('fk_ledger_versions_instance_id_ledger_instances')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_versions')),
        sa.UniqueConstraint('instance_id', 'version',
                            name='uq_ledger_versions_instance_version'),
    )
    op.create_index('ix_ledger_versions_instance_created', 'ledger_versions',
                    ['instance_id', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_ledger_versions_instance_created', table_name='ledger_versions')
    op.drop_table('ledger_versions')
    op.drop_table('ledger_instances')
    op.drop_table('ledger_definitions')
