"""dynamic device groups: a group's filter query

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-05 12:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0032'
down_revision = '0031'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('device_groups', sa.Column('query', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('device_groups') as batch:
        batch.drop_column('query')
