"""fleet vitals rollups per hour and per day, with every firmware version's reports also
under version -1; no per-minute vitals rollups (a report made ~3 rows there: no
compression, and a day's request read millions of them at 100,000 devices, bench B16)

Revision ID: 0038
Revises: 0037
Create Date: 2026-12-05 16:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import corral.db.base

revision = '0038'
down_revision = '0037'
branch_labels = None
depends_on = None

TIME = corral.db.base.UTCDateTime(timezone=True)
KEY = ('product_id', 'segment', 'firmware_version', 'vital', 'bucket', 'bin')


def _create(table: str, key: tuple[str, ...]) -> None:
    op.create_table(
        table,
        sa.Column('product_id', sa.Integer(), nullable=False),
        sa.Column('segment', sa.String(length=40), nullable=False),
        sa.Column('bucket', TIME, nullable=False),
        sa.Column('firmware_version', sa.Integer(), nullable=False),
        sa.Column('vital', sa.String(length=16), nullable=False),
        sa.Column('bin', sa.Integer(), nullable=False),
        sa.Column('count', sa.Integer(), nullable=False),
        sa.Column('low', sa.Float(), nullable=False),
        sa.Column('high', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint(*key, name=op.f(f'pk_{table}')),
    )
    op.create_index(f'ix_{table}_bucket', table, ['bucket'])


def _drop(table: str) -> None:
    op.drop_index(f'ix_{table}_bucket', table_name=table)
    op.drop_table(table)


def upgrade() -> None:
    # 0037's tables held rollups of an hour or so of reports (landed the same day): they
    # are rebuilt with the new key rather than converted
    for table in ('fleet_vitals_minutes', 'fleet_vitals_hours'):
        _drop(table)
    for table in ('fleet_vitals_hours', 'fleet_vitals_days'):
        _create(table, KEY)


def downgrade() -> None:
    for table in ('fleet_vitals_days', 'fleet_vitals_hours'):
        _drop(table)
    old = ('product_id', 'segment', 'vital', 'bucket', 'firmware_version', 'bin')
    for table in ('fleet_vitals_minutes', 'fleet_vitals_hours'):
        _create(table, old)
