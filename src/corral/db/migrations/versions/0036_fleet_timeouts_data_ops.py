"""fleet rollups: timed-out function calls and variable reads as their own outcome, and
data operations per bucket

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-05 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0036'
down_revision = '0035'
branch_labels = None
depends_on = None

TABLES = ('fleet_minutes', 'fleet_hours', 'fleet_segment_minutes', 'fleet_segment_hours')
COLUMNS = ('fn_timeout', 'var_timeout', 'data_ops')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            for column in COLUMNS:
                batch_op.add_column(sa.Column(column, sa.Integer(), server_default='0',
                                              nullable=False))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            for column in reversed(COLUMNS):
                batch_op.drop_column(column)
